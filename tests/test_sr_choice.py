"""The node carries the engine's degradation estimate and choice into the derived series, the
job record, the audit log and the safety gate (a series outside every trained family goes out
as interpolation, labelled as such)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import torch
from scipy import ndimage

from dicom_node.pipeline import derive_series
from sr_engine.data import mr_phantom
from sr_engine.degrade import Degradation, apply_inplane
from sr_engine.normalise import mapping_for
from storage.jobs import JobQueue
from tests.dicom_factory import make_mr_series
from tests.support.dcmtk import storescu
from tests.support.faults import wait_for_jobs
from tests.support.node import node_config, running_node

SEED = 515151  # held-out phantoms, not a training seed


def _outside_family_series(out: Path, n: int = 6, size: int = 128) -> list[Path]:
    """An MR series whose low resolution comes from no trained degradation: area averaging,
    then a strong blur along the rows only."""
    rng = np.random.default_rng(SEED)
    hr = np.stack([1000.0 * mr_phantom(size, rng) for _ in range(n)]).astype(np.float32)
    mapping = mapping_for(hr, "MR")
    with torch.inference_mode():
        x = torch.from_numpy(mapping.forward(hr)).unsqueeze(1)
        lr = mapping.inverse(apply_inplane(x, 2, Degradation.of("area", sigma_n=0.3))
                             .squeeze(1).numpy())
    weird = ndimage.gaussian_filter1d(lr, 2.5, axis=2)
    paths = make_mr_series(out, n_slices=n)
    for path, img in zip(paths, weird, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # an acquisition, not a reformat
        ds.Rows, ds.Columns = img.shape
        ds.PixelSpacing = [2.0, 2.0]
        ds.PixelRepresentation = 0
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PixelData = np.clip(np.rint(img), 0, 65535).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def _final_job(queue: JobQueue) -> dict:
    """The first job once it is done, failed or held (the test's one series)."""
    return wait_for_jobs(queue, lambda jobs: jobs[0]["state"] in ("done", "failed", "held"),
                         timeout=120, interval=0.2, what="the job to finish")[0]


def test_outside_every_family_goes_out_as_labelled_interpolation(tmp_path: Path) -> None:
    paths = _outside_family_series(tmp_path / "mr")
    cfg = node_config(tmp_path / "a")
    d = derive_series(paths, cfg, mode="slice", scale=2, model="auto")
    summary = d.summary()
    assert summary["choice"] == "interpolation" and summary["fallback_reason"], summary
    assert summary["degradation"]["in_family"] is False
    assert summary["model"] == "bicubic"
    assert d.gate == "send" and "interpolation" in d.gate_reason
    for ds in d.datasets:
        assert "interpolation bicubic" in ds.DerivationDescription
        assert str(ds.SeriesDescription).startswith("INTERP x2")
    # the same series with the fallback held for a human
    held = node_config(tmp_path / "b", safety={"on_fallback": "hold"})
    assert derive_series(paths, held, mode="slice", scale=2, model="auto").gate == "hold"
    skip = node_config(tmp_path / "c", safety={"on_fallback": "skip"})
    d = derive_series(paths, skip, mode="slice", scale=2, model="auto")
    assert d.gate == "skip" and d.gate_reason.startswith("not sent: interpolation only")


def test_on_fallback_skip_finishes_the_job_without_a_derived_series(tmp_path: Path) -> None:
    """``[safety] on_fallback = "skip"``: a series the engine would only interpolate is not
    sent; the job is done, its record and the audit log say why; nothing is left on disk."""
    from tests.support.dcmtk import StoreSCP

    paths = _outside_family_series(tmp_path / "mr")
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS").start()
    cfg = node_config(
        tmp_path / "node", safety={"on_fallback": "skip"},
        rules=[{"name": "r", "modalities": ["MR"], "destinations": ["pacs"]}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs.port}])
    with pacs, running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, paths, called_ae_title="SRNODE")
        assert rc == 0, out
        job = _final_job(queue)
        assert job["state"] == "done", job
        assert not pacs.files()  # nothing was sent
    result = job["result"]
    assert result["skipped"] is True and result["gate"] == "skip"
    assert result["choice"] == "interpolation" and result["destinations"] == {}
    derived = Path(cfg.node.storage_dir) / "derived" / f"job-{job['id']}"
    assert not derived.exists() or not any(derived.rglob("*.dcm"))
    audit = [json.loads(x) for x in Path(cfg.node.audit_log).read_text().splitlines()]
    done = [e for e in audit if e["event"] == "job_done"]
    assert done and done[0]["sent"] is False and "interpolation only" in done[0]["reason"]
    assert not [e for e in audit if e["event"] == "series_sent"]


def test_job_record_and_audit_carry_the_estimate_and_choice(tmp_path: Path) -> None:
    paths = _outside_family_series(tmp_path / "mr")
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["MR"]}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, paths, called_ae_title="SRNODE")
        assert rc == 0, out
        job = _final_job(queue)
    assert job["state"] == "done", job
    result = job["result"]
    assert result["choice"] == "interpolation" and result["degradation"]["family"]
    assert 0.0 <= result["degradation"]["confidence"] <= 1.0
    audit = [json.loads(x) for x in Path(cfg.node.audit_log).read_text().splitlines()]
    done = [e for e in audit if e["event"] == "job_done"]
    assert done and done[0]["choice"] == "interpolation" and done[0]["in_family"] is False


def test_volume_mode_adaptation_time_is_bounded_and_recorded(tmp_path: Path) -> None:
    from tests.dicom_factory import make_ct_series

    # 16 slices of 128x128: enough for the slab-profile estimate (fewer fall back to cubic)
    paths = make_ct_series(tmp_path / "ct", n_slices=16, rows=128)
    cfg = node_config(tmp_path, engine={"adapt_seconds": 2.0})
    d = derive_series(paths, cfg, mode="volume", scale=2, model="auto")
    summary = d.summary()
    assert summary["choice"] == "model", summary
    adaptation = summary["adaptation"]
    # reported per job (the budget itself is checked with an injected clock in
    # tests/test_engine_robust.py: no wall-clock bound here)
    assert adaptation is not None and adaptation["seconds"] > 0, adaptation
    assert adaptation["steps"] > 0
    assert "adapted" in d.datasets[0].DerivationDescription
    assert summary["degradation"]["mode"] == "volume" and summary["degradation"]["in_family"]
    # without adaptation nothing is trained
    plain = derive_series(paths, node_config(tmp_path / "b"), mode="volume", scale=2,
                          model="auto")
    assert plain.summary()["adaptation"] is None
