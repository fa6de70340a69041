"""``srnode enhance`` over real-world folders (issue 12, items 5-7): bad files, output errors,
earlier output; the library function in process, the exit codes through the CLI.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_node.config import parse_config
from dicom_node.pipeline import (
    EnhanceError,
    EnhanceIncompleteError,
    enhance_path,
    scan_input,
)
from tests.dicom_factory import make_ct_series
from tests.support.node import srnode_executable

CONFIG = parse_config({})


def _enhance(src: Path, out: Path, **kw: Any) -> dict[str, list[Path]]:
    return enhance_path(src, out, CONFIG, model="linear", progress=False, **kw)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


# --- item 5: bad files are named, skipped series make the run fail -------------------------------


def test_truncated_file_is_named_and_the_run_fails(tmp_path: Path, capsys: Any) -> None:
    paths = make_ct_series(tmp_path / "in", n_slices=5, rows=16)
    _truncate(paths[2], 600)  # header cut off mid-way: no Series Instance UID left
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    # slice mode: the four readable slices are enhanced, the truncated file is named
    with pytest.raises(EnhanceIncompleteError) as incomplete:
        _enhance(tmp_path / "in", tmp_path / "out")
    assert paths[2].name in str(incomplete.value) and "truncated" in str(incomplete.value)
    assert sum(len(v) for v in incomplete.value.written.values()) == 4
    assert "notes.txt" in capsys.readouterr().err  # non-DICOM files are named, not fatal
    # volume mode: the gap refuses the series, and the message points at the unreadable file
    with pytest.raises(EnhanceError) as info:
        _enhance(tmp_path / "in", tmp_path / "out2", mode="volume")
    message = str(info.value)
    assert paths[2].name in message and "truncated" in message
    assert f"unreadable files beside it: {paths[2].name}" in message


def test_truncated_pixel_data_names_the_file(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "in", n_slices=3, rows=16)
    data = paths[1].read_bytes()
    _truncate(paths[1], data.rindex(b"\xe0\x7f\x10\x00") + 12 + 100)  # 100 pixel data bytes
    other = make_ct_series(tmp_path / "in" / "other", n_slices=2, rows=16)
    with pytest.raises(EnhanceIncompleteError) as info:
        _enhance(tmp_path / "in", tmp_path / "out")
    assert paths[1].name in str(info.value) and "non-uniform" not in str(info.value)
    assert len(info.value.written) == 1  # the good series was still written
    written = _enhance(tmp_path / "in" / "other", tmp_path / "out2")
    assert sum(len(v) for v in written.values()) == len(other)


def test_keep_going_returns_what_was_written(tmp_path: Path, capsys: Any) -> None:
    paths = make_ct_series(tmp_path / "in", n_slices=3, rows=16)
    make_ct_series(tmp_path / "in" / "b", n_slices=2, rows=16)
    _truncate(paths[0], 500)  # the first slice: the other two still form a regular stack
    with pytest.raises(EnhanceIncompleteError) as info:
        _enhance(tmp_path / "in", tmp_path / "out")
    assert len(info.value.written) == 2 and paths[0].name in str(info.value)
    written = _enhance(tmp_path / "in", tmp_path / "out2", keep_going=True)
    assert len(written) == 2
    assert paths[0].name in capsys.readouterr().err


def test_data_set_without_part10_header_is_read(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "in", n_slices=3, rows=16)
    for path in paths:  # rewrite as bare data sets: no preamble, no DICM, no file meta
        ds = pydicom.dcmread(path)
        del ds.file_meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        path.write_bytes(fp.getvalue())
    scan = scan_input(tmp_path / "in")
    assert [len(v) for v in scan.series.values()] == [3] and not scan.not_dicom
    written = _enhance(tmp_path / "in", tmp_path / "out")
    assert sum(len(v) for v in written.values()) == 3


def test_cli_exit_codes(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "in", n_slices=3, rows=16)
    make_ct_series(tmp_path / "in" / "b", n_slices=2, rows=16)
    _truncate(paths[0], 500)
    base = [srnode_executable(), "enhance", "--model", "linear", "--quiet", str(tmp_path / "in")]
    r = subprocess.run([*base, str(tmp_path / "o1")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and paths[0].name in r.stderr and "Traceback" not in r.stderr
    assert "derived series" in r.stdout  # what was written is still reported
    r = subprocess.run([*base, str(tmp_path / "o2"), "--keep-going"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and paths[0].name in r.stderr
    # item 6: an output path below a regular file: a clear message, no traceback
    (tmp_path / "file").write_text("x")
    r = subprocess.run([*base[:-1], str(tmp_path / "in" / "b"), str(tmp_path / "file" / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "output" in r.stderr and "Traceback" not in r.stderr


# --- item 6: output errors leave nothing partial -------------------------------------------------


def test_output_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "in", n_slices=2, rows=16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EnhanceError, match="output folder"):
        _enhance(tmp_path / "in", tmp_path / "file" / "out")


def test_full_disk_leaves_no_partial_series(tmp_path: Path, monkeypatch: Any) -> None:
    from storage.filestore import FileStore

    make_ct_series(tmp_path / "in", n_slices=4, rows=16)
    real = FileStore.write_atomic
    calls = {"n": 0}

    def failing(self: FileStore, path: Path, write: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, write)

    monkeypatch.setattr(FileStore, "write_atomic", failing)
    with pytest.raises(EnhanceError, match="No space left") as info:
        _enhance(tmp_path / "in", tmp_path / "out")
    assert "nothing of it" in str(info.value)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# --- item 7: earlier output is not enhanced again ------------------------------------------------


def test_rerun_over_earlier_output_skips_it(tmp_path: Path, capsys: Any) -> None:
    make_ct_series(tmp_path / "in", n_slices=3, rows=16)
    first = _enhance(tmp_path / "in", tmp_path / "in" / "out")
    assert len(first) == 1
    capsys.readouterr()
    second = _enhance(tmp_path / "in", tmp_path / "in" / "out2")
    assert len(second) == 1  # only the original series again, not its own output
    for files in second.values():
        ds = pydicom.dcmread(files[0])
        # labelled once (model "linear" is an interpolation, so the prefix is the
        # interpolation one), not "INTERP x2 INTERP x2"
        assert ds.Rows == 32 and ds.SeriesDescription.startswith("INTERP x2")
        assert ds.SeriesDescription.count("x2") == 1
    assert "own output" in capsys.readouterr().err
    # only earlier output in the folder: nothing to do, and that is no error
    assert _enhance(tmp_path / "in" / "out", tmp_path / "out3") == {}


def test_a_lanczos_blend_chosen_by_auto_is_a_clean_interpolation_series(tmp_path: Path) -> None:
    """The whole pipeline with ``auto`` on a series whose estimate cell takes a Lanczos-3 blend
    (shipped tables): the derived series says interpolation everywhere a person reads it (series
    description, DerivationDescription) and, where dicom3tools' dciodvfy is installed, adds no
    dciodvfy error to its source."""
    import shutil
    import subprocess

    from dicom_node.config import parse_config
    from dicom_node.pipeline import derive_series

    paths = make_ct_series(tmp_path / "src", n_slices=4)
    d = derive_series(paths, parse_config({}), mode="slice", scale=2, model="auto")
    assert d.result.model_name == "lanczos3" and d.result.interpolated, d.result.describe()
    for ds in d.datasets:
        assert ds.SeriesDescription.startswith("INTERP x2")
        text = str(ds.DerivationDescription)
        assert text.startswith("Interpolation (not super-resolution) by srnode")
        assert "lanczos3 blended" in text and "Super-resolution" not in text
    if shutil.which("dciodvfy") is None:
        return

    def errors(path: Path) -> set[str]:
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line for line in (out.stdout + out.stderr).splitlines()
                if line.startswith("Error")}

    out = tmp_path / "derived.dcm"
    d.datasets[0].save_as(out, enforce_file_format=True)
    assert not errors(out) - errors(paths[0])
