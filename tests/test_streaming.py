"""Slab streaming: the same voxels as the whole-volume path, and no published partial series.

- volume mode: output ranges whose boundaries cut the series (with the self-ensemble, with and
  without through-plane resampling) give the voxels and re-degradation check of
  :func:`sr_engine.enhance_volume` on the whole volume;
- slice mode: slabs of slices give the whole-volume output;
- ``srnode serve`` killed (-9) while its job child has written part of the derived series:
  nothing was published or sent, and the retry derives and sends the complete series once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from dicom_node.worker import MANIFEST
from sr_engine import enhance_volume
from sr_engine.api import EnhanceRequest
from sr_engine.normalise import mapping_for
from sr_engine.stream import SeriesEnhancer, SeriesFacts, estimate_picks
from storage.db import Database
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support.dcmtk import storescu
from tests.support.faults import ServedNode, orthanc_series_counts, wait_for_jobs
from tests.support.orthanc import OrthancServer


def _phantom(n: int, size: int, seed: int = 3) -> np.ndarray:
    """A CT-like volume (HU): a body with structures that vary along z, air around it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(n), np.arange(size), np.arange(size), indexing="ij")
    c = (size - 1) / 2
    body = ((y - c) ** 2 + (x - c) ** 2) < (0.42 * size) ** 2
    vol = np.where(body, 40.0, -1000.0)
    for _ in range(6):
        cz, cy, cx = rng.uniform(0, n), rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        r = rng.uniform(0.05, 0.15) * size
        blob = ((z - cz) * 2.5) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        vol = np.where(blob & body, rng.uniform(-200, 900), vol)
    vol += rng.normal(0, 5, vol.shape)
    return vol.astype(np.float32)


def _facts(vol: np.ndarray, spacing: tuple[float, float, float], thickness: float) -> SeriesFacts:
    return SeriesFacts(vol.shape[0], vol.shape[1], vol.shape[2], spacing, thickness, "CT",
                       float(vol.min()), float(vol.max()), mapping_for(vol, "CT"))


@pytest.mark.parametrize("output_spacing", [None, 0.9])
def test_volume_slab_boundaries_give_the_whole_volume_voxels(output_spacing: float | None) -> None:
    """Ranges cut anywhere (self-ensemble on) equal the whole-volume path within float rounding."""
    vol = _phantom(20, 48)
    spacing, thickness = (2.0, 0.8, 0.8), 2.0
    request = EnhanceRequest(mode="volume", scale=2, model="fast", device="cpu",
                             self_ensemble=True, output_spacing=output_spacing,
                             estimate_degradation=True, adapt_seconds=0.0)
    whole = enhance_volume(vol, spacing, thickness, "CT", request)
    assert whole.extra["self_ensemble"] is True
    engine = SeriesEnhancer(request, _facts(vol, spacing, thickness), vol)
    m = engine.num_outputs
    assert m == whole.volume.shape[0]
    cuts = [0, 5, 6, 17, m // 2 + 1, m]  # boundaries inside the context, at odd offsets
    parts = [engine.enhance_output_range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    streamed = np.concatenate(parts)
    result = engine.finish()
    assert streamed.shape == whole.volume.shape
    worst = float(np.max(np.abs(streamed - whole.volume)))
    assert worst < 0.05, worst  # HU; a range computed without enough context is off by tens
    assert result.slice_offsets == pytest.approx(whole.slice_offsets)
    assert result.contributing_slices == whole.contributing_slices
    assert result.model_name == whole.model_name and result.extra["self_ensemble"] is True
    assert result.consistency.mean_abs_error == pytest.approx(
        whole.consistency.mean_abs_error, rel=1e-4, abs=1e-4)
    assert result.consistency.psnr == pytest.approx(whole.consistency.psnr, abs=0.01)


def test_volume_ranges_from_a_budget_cover_the_series_once() -> None:
    """The budget's ranges are contiguous, disjoint and cover every output slice."""
    vol = _phantom(30, 32)
    request = EnhanceRequest(mode="volume", scale=4, model="fast", device="cpu",
                             estimate_degradation=False, adapt_seconds=0.0)
    engine = SeriesEnhancer(request, _facts(vol, (2.0, 1.0, 1.0), 2.0), vol)
    ranges = list(engine.output_ranges(budget_mb=1.0))
    assert len(ranges) > 1
    assert ranges[0][0] == 0 and ranges[-1][1] == engine.num_outputs
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_slice_slabs_give_the_whole_volume_voxels() -> None:
    """Slice mode: slabs of any length equal the whole-volume output and check."""
    vol = _phantom(9, 40)
    request = EnhanceRequest(mode="slice", scale=2, model="fast", device="cpu")
    whole = enhance_volume(vol, (1.0, 0.7, 0.7), 1.0, "CT", request)
    sample = vol[estimate_picks(len(vol))]
    engine = SeriesEnhancer(request, _facts(vol, (1.0, 0.7, 0.7), 1.0), sample)
    streamed = np.concatenate([engine.enhance_slices(vol[a:b]) for a, b in ((0, 4), (4, 5),
                                                                            (5, 9))])
    result = engine.finish()
    assert result.model_name == whole.model_name
    assert result.degradation is not None and whole.degradation is not None
    seen, expected = result.degradation.as_dict(), whole.degradation.as_dict()
    seen.pop("seconds"), expected.pop("seconds")
    assert seen == expected  # the estimate from its picked slices is the whole-series one
    assert float(np.max(np.abs(streamed - whole.volume))) < 0.05
    assert result.consistency.psnr == pytest.approx(whole.consistency.psnr, abs=0.01)


def test_kill9_mid_series_publishes_nothing_and_the_retry_completes_it(tmp_path: Path) -> None:
    """kill -9 after part of the derived series was written: no manifest, nothing sent; the
    retry (after the lease) derives and sends exactly one complete derived series."""
    ct = make_ct_series(tmp_path / "ct", n_slices=30, rows=128)
    with OrthancServer(tmp_path / "orthanc") as pacs:
        node = ServedNode(
            tmp_path,
            worker={"lease_seconds": 3.0, "heartbeat_seconds": 0.5,
                    "backoff_base_seconds": 0.5, "max_attempts": 3},
            # 1 MB: one 128x128 slice per slab, so the job writes slab after slab
            engine={"adapt_seconds": 0.0, "memory_budget_mb": 1.0},
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                           "port": pacs.dicom_port}],
            rules=[{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                    "model": "fast", "destinations": ["pacs"]}],
        )
        node.start()
        db = Database(node.database_url)
        queue = JobQueue(db)
        try:
            rc, out = storescu("127.0.0.1", node.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            job = wait_for_jobs(queue, lambda j: j[0]["state"] == "running", timeout=120,
                                interval=0.05, what="job running")[0]
            folder = node.storage_dir / "derived" / f"job-{job['id']}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(list(folder.glob("*.dcm"))) < 5:
                time.sleep(0.01)
            node.kill9()
            partial = len(list(folder.glob("*.dcm")))
            assert 5 <= partial < len(ct)  # killed mid-series
            assert not (folder / MANIFEST).exists()  # nothing published
            assert orthanc_series_counts(pacs) == {}  # nothing sent
            node.start()
            jobs = wait_for_jobs(queue, lambda j: j[0]["state"] in ("done", "failed", "held"),
                                 timeout=180, what="job finished after restart")
        finally:
            node.stop()
            db.dispose()
        assert jobs[0]["state"] == "done", (jobs[0], node.log()[-3000:])
        assert jobs[0]["attempts"] == 2
        derived_uid = jobs[0]["result"]["derived_series_instance_uid"]
        assert orthanc_series_counts(pacs) == {derived_uid: len(ct)}
        # the job folder holds the published series only: the killed attempt's files are gone
        names = {p.name for p in folder.glob("*.dcm")}
        manifest = json.loads((folder / MANIFEST).read_text())
        assert names == set(manifest["files"]) and len(names) == len(ct)


def test_mr_mapping_from_slice_statistics_equals_the_whole_volume_mapping() -> None:
    """The MR intensity mapping gathered slice by slice is the whole-volume one."""
    from sr_engine.normalise import MagnitudeStats, mapping_from_stats

    rng = np.random.default_rng(5)
    for case in range(60):
        vol = rng.gamma(2.0, rng.uniform(1, 3000), size=(6, 24, 24)).astype(np.float32)
        if case % 3 == 0:
            vol = np.round(vol)
        if case % 4 == 0:
            vol -= np.float32(50)
        stats = MagnitudeStats()
        for plane in vol:
            stats.add(plane)
        assert mapping_from_stats(stats, "MR") == mapping_for(vol, "MR"), case


@pytest.mark.parametrize(("mode", "model"), [("slice", "fast"), ("volume", "fast")])
def test_streamed_series_keeps_pixel_padding_and_is_dciodvfy_clean(
    tmp_path: Path, mode: str, model: str
) -> None:
    """Slabs of one slice: padding written back as padding, the figures filled in, IOD-clean."""
    import pydicom

    from dicom_node.pipeline import derive_series_to
    from tests.support.node import node_config
    from tests.test_derive_sources import _padded_ct, assert_no_new_dciodvfy_errors

    paths = _padded_ct(tmp_path / "src", rows=32)
    cfg = node_config(tmp_path / "node", engine={"adapt_seconds": 0.0, "memory_budget_mb": 0.01})
    w = derive_series_to(paths, cfg, tmp_path / "out", mode=mode, scale=2, model=model)
    assert w.gate != "hold" and len(w.paths) == w.summary()["instances"]
    out = [pydicom.dcmread(p) for p in w.paths]
    for ds in out:
        assert ds.PixelPaddingValue == -2000
        arr = ds.pixel_array
        assert np.all(arr[:, : arr.shape[1] // 4] == -2000)  # the padded columns
        assert np.all(arr[:, arr.shape[1] // 4:] != -2000)
        assert "Re-degradation check" in ds.DerivationDescription
        assert "SRNODE-PENDING" not in ds.DerivationDescription
    assert_no_new_dciodvfy_errors(paths, out, tmp_path / "check")


def test_streamed_slices_use_a_half_strength_pick_like_the_whole_volume(tmp_path: Path) -> None:
    """A selection table picking ``hedge@0.5``: the streamed job (the worker's path) runs the
    same half-strength weights as ``enhance_volume`` and gives the same voxels."""
    import json

    from sr_engine.estimate import INPLANE_GROUPS

    cells = [f"{g}|{b}" for g in INPLANE_GROUPS for b in (0, 1)]
    (tmp_path / "selection_slice_x2.json").write_text(json.dumps(
        {"confidence_bins": [0.8], "cases": {c: 20 for c in cells},
         "by_estimate": {"hedge@0.5": {c: 0.5 for c in cells}}}))
    vol = _phantom(6, 48)
    request = EnhanceRequest(mode="slice", scale=2, device="cpu")  # auto, as the node runs
    whole = enhance_volume(vol, (1.0, 0.7, 0.7), 1.0, "CT", request, weights_dir=tmp_path)
    engine = SeriesEnhancer(request, _facts(vol, (1.0, 0.7, 0.7), 1.0),
                            vol[estimate_picks(len(vol))], weights_dir=tmp_path)
    streamed = np.concatenate([engine.enhance_slices(vol[a:b]) for a, b in ((0, 2), (2, 6))])
    result = engine.finish()
    assert whole.extra["weights_group"] == "hedge@0.5" == result.extra["weights_group"]
    assert result.model_version.endswith("-residual0.5")
    assert float(np.max(np.abs(streamed - whole.volume))) < 0.05
