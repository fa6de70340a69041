"""Before/after pictures: window choice, the derived slice at the source's position, PNGs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from dicom_node.console.pictures import (
    RenderRequest,
    Stack,
    apply_window,
    choose_window,
    load_stack,
    render,
)
from tests.dicom_factory import make_ct_series, make_mr_series


def _decode(path: Path) -> np.ndarray:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width + 1)[:, 1:]


def _stack(window: tuple[float, float] | None, modality: str) -> Stack:
    vol = np.linspace(-1000, 1000, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    return Stack(vol, np.array([0.0, 1.0]), (1.0, 1.0), window, modality)


def test_window_from_the_header_else_a_modality_default() -> None:
    assert choose_window(_stack((300.0, 1500.0), "CT")) == (300.0, 1500.0)
    assert choose_window(_stack(None, "CT")) == (40.0, 400.0)
    center, width = choose_window(_stack(None, "MR"))  # percentiles of the volume
    assert -100 < center < 100 and 1500 < width < 2000
    img = apply_window(np.array([[-200.0, 40.0, 240.0]]), (40.0, 400.0))
    assert img.tolist() == [[0, 128, 255]]


def test_after_is_the_derived_slice_at_the_same_position(tmp_path: Path) -> None:
    source = make_ct_series(tmp_path / "src", n_slices=4, rows=16, spacing=5.0)
    # more slices at half the spacing, starting at the same position along the normal
    derived = make_ct_series(tmp_path / "der", n_slices=10, rows=32, spacing=2.5)
    out = tmp_path / "out"
    written = render(RenderRequest(tuple(map(str, source)), tuple(map(str, derived)), True,
                                   str(out)))
    assert set(written) == {"before", "after", "difference", "before-sagittal",
                            "before-coronal", "after-sagittal", "after-coronal"}
    src, der = load_stack(list(map(str, source))), load_stack(list(map(str, derived)))
    window = choose_window(src)
    middle = src.positions[2]
    nearest = int(np.argmin(np.abs(der.positions - middle)))
    assert abs(der.positions[nearest] - middle) < 1e-3  # a derived slice lies there
    assert nearest != len(derived) // 2  # ... and it is not the derived series' middle one
    assert (_decode(out / "before.png") == apply_window(src.volume[2], window)).all()
    assert (_decode(out / "after.png") == apply_window(der.volume[nearest], window)).all()
    assert _decode(out / "difference.png").shape == (32, 32)
    # reformats: superior up, square pixels (4 slices x 5 mm over a 16-pixel field of view)
    sag = _decode(out / "before-sagittal.png")
    step = src.pixel_spacing[0]
    assert sag.shape == (round(4 * 5.0 / step), 16)


def test_multiframe_and_mr_sources_load(tmp_path: Path) -> None:
    [enhanced] = make_ct_series(tmp_path / "e", n_slices=3, rows=16, enhanced=True)
    stack = load_stack([str(enhanced)])
    assert stack.volume.shape == (3, 16, 16)
    assert np.all(np.diff(stack.positions) > 0)
    mr = load_stack(list(map(str, make_mr_series(tmp_path / "m", n_slices=2, rows=16))))
    assert mr.modality == "MR" and mr.volume.shape == (2, 16, 16)


def test_service_caches_prunes_and_reports_unreadable_files(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    from dicom_node.console.pictures import PictureService, PictureUnavailableError, RenderError

    cache = tmp_path / "cache"
    series = [make_ct_series(tmp_path / f"s{i}", n_slices=2, rows=16) for i in range(3)]
    with ThreadPoolExecutor(1) as pool:
        service = PictureService(cache, executor=pool, max_jobs=2)
        first = service.picture(1, "before", series[0], [], False)
        assert first.read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(PictureUnavailableError):
            service.picture(1, "after", series[0], [], False)  # nothing derived
        with pytest.raises(PictureUnavailableError):
            service.picture(1, "before-sagittal", series[0], [], False)  # not volume mode
        # a changed input file is rendered again, into a new folder; the old one goes
        series[0][0].write_bytes(series[0][0].read_bytes())
        second = service.picture(1, "before", series[0], [], False)
        assert second != first and not first.parent.exists()
        service.picture(2, "before", series[1], [], False)
        service.picture(3, "before", series[2], [], False)
        assert sorted(p.name for p in cache.iterdir()) == ["job-2", "job-3"]  # at most 2 jobs
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(b"not DICOM")
        with pytest.raises(RenderError, match="job 4"):
            service.picture(4, "before", [broken], [], False)
