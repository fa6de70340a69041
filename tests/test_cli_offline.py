"""``srnode enhance`` and ``srnode evaluate``: the pipeline offline, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom

from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support.node import sample_file, srnode_executable


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([srnode_executable(), *args], capture_output=True, text=True,
                          timeout=300)


def test_enhance_finds_every_series_under_a_folder_and_writes_derived_series(
    tmp_path: Path,
) -> None:
    ct = make_ct_series(tmp_path / "in" / "a" / "b", n_slices=3, rows=32)
    mr = make_mr_series(tmp_path / "in" / "c", n_slices=3, rows=32)
    # odd file names and a non-DICOM file must not matter
    ct[0].rename(ct[0].with_name("IMG0001"))
    (tmp_path / "in" / "README.txt").write_text("not DICOM")
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out"), "--mode", "slice",
             "--scale", "2", "--model", "fast")
    assert r.returncode == 0, r.stderr
    assert "series:" in r.stderr  # the progress bar
    out = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(out) == len(ct) + len(mr)
    series = {}
    for f in out:
        ds = pydicom.dcmread(f)
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert len(series) == 2
    for datasets in series.values():
        ds = datasets[0]
        assert ds.Rows == 64 and ds.Columns == 64
        assert ds.ImageType[0] == "DERIVED" and "SRNODE" in ds.ImageType
        assert ds.SeriesDescription.startswith("SR x2")
        assert np.isfinite(ds.pixel_array.astype(float)).all()


def test_enhance_volume_mode_multiplies_the_slices(tmp_path: Path) -> None:
    make_ct_series(tmp_path / "in", n_slices=4, rows=16, spacing=4.0, thickness=4.0)
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out"), "--mode", "volume",
             "--scale", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    out = [pydicom.dcmread(f) for f in (tmp_path / "out").rglob("*.dcm")]
    assert len(out) == 8
    assert {float(d.SliceThickness) for d in out} == {2.0}


def test_enhance_fails_clearly_when_nothing_can_be_enhanced(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("nothing here")
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out"))
    assert r.returncode != 0
    assert "no DICOM files" in r.stderr
    shutil.copy(sample_file("SC_rgb.dcm"), tmp_path / "in" / "colour.dcm")
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out"))
    assert r.returncode != 0 and "nothing could be enhanced" in r.stderr
    r = _run("enhance", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_evaluate_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    r = _run("evaluate", "--mode", "slice", "--scale", "2", "--model", "fast", "--json",
             str(report), str(sample_file("CT_small.dcm")), str(sample_file("MR_small.dcm")))
    assert r.returncode == 0, r.stderr
    assert "mean PSNR gain" in r.stdout
    data = json.loads(report.read_text())
    assert len(data["cases"]) == 2
    for case in data["cases"]:
        assert set(case) >= {"name", "psnr", "psnr_baseline", "ssim", "ssim_baseline",
                             "seconds_per_slice", "model_used", "choice",
                             "estimated_degradation"}
        assert 10 < case["psnr"] < 80 and 0 < case["ssim"] <= 1
        assert case["psnr"] != case["psnr_baseline"]
        # an explicit model is obeyed; the estimate is still reported
        assert case["model_used"] == "fast" and case["estimated_degradation"]["family"]
        assert "fast" in case["choice"]
    gains = [c["psnr"] - c["psnr_baseline"] for c in data["cases"]]
    assert abs(np.mean(gains) - data["mean_psnr_gain_db"]) < 0.01  # values are rounded


def test_evaluate_over_every_degradation_checks_the_promise(tmp_path: Path) -> None:
    """``--degradations all``: each image degraded by every family and every operator outside
    them; the node's choice keeps the promise, the nominal weights do not (``--check``)."""
    from sr_engine.evaluation import degradation_catalogue

    labels = [label for label, _, _ in degradation_catalogue("slice", "all")]
    images = [str(sample_file("CT_small.dcm")), str(sample_file("MR_small.dcm"))]
    report = tmp_path / "robust.json"
    r = _run("evaluate", "--mode", "slice", "--scale", "2", "--degradations", "all",
             "--check", "--json", str(report), *images)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "promise kept" in r.stdout
    for label in labels:
        assert label[:32] in r.stdout
    data = json.loads(report.read_text())
    assert data["model"] == "auto" and data["promise_kept"] and data["below"] == 0
    assert len(data["rows"]) == 2 * len(labels) and set(data["by_degradation"]) == set(labels)
    kinds = {d["kind"] for d in data["by_degradation"].values()}
    assert kinds == {"family", "held-out", "outside", "outside, validation stress"}
    for row in data["rows"]:
        assert abs(row["psnr"] - row["psnr_baseline"] - row["gain"]) < 0.002
        assert row["gain"] >= -0.1 and row["choice"]
    # the unguarded nominal weights break it on some of these: reported, exit status 1
    r = _run("evaluate", "--mode", "slice", "--scale", "2", "--degradations", "all",
             "--model", "fast", "--check", *images)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "PROMISE BROKEN" in r.stdout
    # without --check the same report exits 0 (a comparison, not a gate)
    r = _run("evaluate", "--mode", "slice", "--scale", "2", "--degradations", "families",
             "--model", "fast", str(sample_file("CT_small.dcm")))
    assert r.returncode == 0 and "PROMISE BROKEN" in r.stdout, r.stdout + r.stderr


def test_evaluate_over_every_slab_profile_in_volume_mode(tmp_path: Path) -> None:
    from sr_engine.evaluation import degradation_catalogue

    series = make_mr_series(tmp_path / "mr", n_slices=32, rows=64)
    report = tmp_path / "robust.json"
    r = _run("evaluate", "--mode", "volume", "--scale", "2", "--degradations", "all",
             "--adapt-seconds", "0.1", "--json", str(report), str(series[0].parent))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(report.read_text())
    assert data["baseline"] == "cubic"
    # the node's per-series adaptation ran where the node used learned weights
    assert any("adapted" in row["choice"] for row in data["rows"] if not row["fallback"])
    assert set(data["by_degradation"]) == {label for label, _, _ in
                                           degradation_catalogue("volume", "all")}


def test_train_then_swap_the_model_through_the_config(tmp_path: Path) -> None:
    import hashlib

    from sr_engine.models import WEIGHTS_DIR

    shipped = (WEIGHTS_DIR / "fast_slice_x2.safetensors").read_bytes()
    models = tmp_path / "models"
    r = _run("train", "--model", "fast", "--mode", "slice", "--scale", "2", "--steps", "20",
             "--out", str(models), "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    weights = models / "fast_slice_x2.safetensors"
    assert weights.is_file() and "weights_dir" in r.stdout
    assert (WEIGHTS_DIR / "fast_slice_x2.safetensors").read_bytes() == shipped  # untouched
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[engine]\nweights_dir = "{models}"\n')
    make_ct_series(tmp_path / "in", n_slices=2, rows=16)
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "fast",
             "--quiet", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert digest in ds.DerivationDescription  # provenance names the swapped weights
    # a model the folder lacks still comes from the shipped weights
    r = _run("enhance", str(tmp_path / "in"), str(tmp_path / "out4"), "--model", "fast",
             "--scale", "4", "--quiet", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
