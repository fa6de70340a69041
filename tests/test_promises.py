"""Promises the README makes that earlier tests could not see break (lease renewal, the order of
durable writes, timeouts that really stop the child, the worker's backoff wait)."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import event

from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import store_instance
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support.db import synthetic_instance
from tests.support.dcmtk import storescu
from tests.support.headers import read_header
from tests.support.node import node_config, running_node

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.71.1"


def _poll(predicate, timeout: float = 90.0, interval: float = 0.05):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached before the deadline")


def test_worker_renews_the_lease_while_the_child_runs(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32)
    cfg = node_config(tmp_path, worker={"heartbeat_seconds": 0.2, "lease_seconds": 30.0},
                      rules=[{"name": "r", "modalities": ["CT"]}])
    leases: set[str] = set()
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out

        def finished() -> bool:
            jobs = queue.list_jobs()
            for j in jobs:
                if j["state"] == "running" and j["lease_expires_at"]:
                    leases.add(j["lease_expires_at"])
            return bool(jobs) and jobs[0]["state"] in ("done", "failed", "held")

        _poll(finished, interval=0.05)
        assert queue.list_jobs()[0]["state"] == "done"
    # the claim sets the lease once; only heartbeats move it while the child works
    assert len(leases) >= 2, leases


def test_processing_timeout_kills_the_child_before_the_job_fails(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    cfg = node_config(tmp_path, worker={"job_timeout_seconds": 0.5, "max_attempts": 1},
                      rules=[{"name": "r", "modalities": ["CT"]}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        job = _poll(lambda: next((j for j in queue.list_jobs() if j["state"] == "failed"), None),
                    interval=0.01)
        # checked the moment the job is marked failed: its child must already be gone
        alive = [p.name for p in multiprocessing.active_children()
                 if p.name == f"srnode-job-{job['id']}" and p.is_alive()]
        assert alive == [], alive
        assert "timeout" in job["error"]


def test_failed_send_waits_the_configured_backoff(tmp_path: Path, refused_port: int) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    cfg = node_config(
        tmp_path,
        worker={"backoff_base_seconds": 40.0, "max_attempts": 3},
        destinations=[{"name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1",
                       "port": refused_port}],
        rules=[{"name": "r", "modalities": ["CT"], "destinations": ["nowhere"]}],
    )
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        job = _poll(lambda: next((j for j in queue.list_jobs()
                                  if j["state"] == "queued" and j["attempts"] == 1), None))
    failed_at = datetime.fromisoformat(job["history"][-1]["at"])
    wait = (datetime.fromisoformat(job["not_before"]) - failed_at).total_seconds()
    assert 39.0 <= wait <= 41.0, wait  # base * 2**0 after the first attempt


def _trace_durability(monkeypatch) -> list[tuple[str, ...]]:  # noqa: ANN001
    """Record fsync (with the file or folder it hits), rename and index commits, in order."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_received_file_is_fsynced_renamed_folder_fsynced_then_indexed(
    tmp_path: Path, monkeypatch  # noqa: ANN001
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    db.upgrade()
    store = FileStore(tmp_path / "storage")
    events = _trace_durability(monkeypatch)
    event.listen(db.engine, "commit", lambda conn: events.append(("commit",)))
    for k in (1, 2):  # the new-series (ORM) path, then the known-series fast path
        del events[:]
        data = synthetic_instance(STUDY, SERIES, f"{SERIES}.{k}")
        header = read_header(data)
        store_instance(db, store, header, store.begin_write(data), "MODALITY")
        final = str(store.instance_path(STUDY, SERIES, f"{SERIES}.{k}"))
        rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final)
        tmp = events[rename][1]
        file_sync = [i for i, e in enumerate(events) if e == ("fsync", tmp)]
        dir_sync = [i for i, e in enumerate(events)
                    if e == ("fsync", str(Path(final).parent)) and i > rename]
        commits = [i for i, e in enumerate(events) if e == ("commit",) and i > rename]
        assert file_sync and file_sync[0] < rename, events
        assert dir_sync, events
        assert commits and commits[-1] > dir_sync[0], events
    db.dispose()


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch  # noqa: ANN001
) -> None:
    store = FileStore(tmp_path)
    events = _trace_durability(monkeypatch)
    target = tmp_path / "derived" / "1.2.3.dcm"
    store.write_atomic(target, b"DICM" * 100)
    rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target))
    assert ("fsync", events[rename][1]) in events[:rename], events
    assert ("fsync", str(target.parent)) in events[rename + 1:], events


def _oblique_stack(tmp_path: Path, descending: bool) -> list[Path]:
    """A CT stack with an oblique orientation, non-square pixels (0.7 mm rows, 0.9 mm columns)
    and positions along the normal (descending: z falls as InstanceNumber rises)."""
    import numpy as np
    import pydicom

    paths = make_ct_series(tmp_path / "oblique", n_slices=4, rows=32, spacing=2.5,
                           thickness=2.5)
    a, b = np.deg2rad(20.0), np.deg2rad(12.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), -np.sin(b)])
    normal = np.cross(row, col)
    origin = np.array([-40.0, 25.0, 110.0])
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        step = -k if descending else k
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in (*row, *col)]
        ds.PixelSpacing = [0.7, 0.9]
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in origin + normal * 2.5 * step]
        ds.InstanceNumber = k + 1
        if "SliceLocation" in ds:
            del ds.SliceLocation
        ds.save_as(path, enforce_file_format=True)
    return paths


def _plane(ds) -> tuple:  # noqa: ANN001
    import numpy as np

    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    p = np.array([float(v) for v in ds.ImagePositionPatient])
    first = p - row * dx / 2 - col * dy / 2  # outer corner of the first pixel
    last = p + row * dx * (int(ds.Columns) - 0.5) + col * dy * (int(ds.Rows) - 0.5)
    return np.cross(row, col), first, last


def test_slice_mode_keeps_the_field_of_view_on_oblique_non_square_stacks(tmp_path: Path) -> None:
    import numpy as np

    from dicom_node.pipeline import derive_series

    for descending in (False, True):
        paths = _oblique_stack(tmp_path / str(descending), descending)
        cfg = node_config(tmp_path / f"cfg{descending}")
        d = derive_series(paths, cfg, mode="slice", scale=2, model="bicubic")
        import pydicom

        sources = [pydicom.dcmread(p) for p in paths]
        src_planes = {round(float(np.dot(_plane(s)[1], _plane(s)[0])), 3): _plane(s)
                      for s in sources}
        assert len(d.datasets) == len(sources)
        for ds in d.datasets:
            normal, first, last = _plane(ds)
            src = src_planes[round(float(np.dot(first, normal)), 3)]
            assert np.allclose(first, src[1], atol=2e-3), (first, src[1])
            assert np.allclose(last, src[2], atol=2e-3), (last, src[2])
            assert (int(ds.Rows), int(ds.Columns)) == (64, 64)


def test_volume_mode_slices_partition_the_source_slabs(tmp_path: Path) -> None:
    import numpy as np

    from dicom_node.pipeline import derive_series

    for descending in (False, True):
        paths = _oblique_stack(tmp_path / str(descending), descending)
        cfg = node_config(tmp_path / f"cfg{descending}")
        d = derive_series(paths, cfg, mode="volume", scale=2, model="linear")
        normal = _plane(d.datasets[0])[0]
        centres = sorted(float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
                         for ds in d.datasets)
        import pydicom

        src = sorted(float(np.dot([float(v) for v in pydicom.dcmread(p).ImagePositionPatient],
                                  normal)) for p in paths)
        # four 2.5 mm slabs become eight 1.25 mm slices tiling [first - 1.25, last + 1.25]
        expected = [src[0] - 1.25 + (k + 0.5) * 1.25 for k in range(8)]
        assert np.allclose(centres, expected, atol=2e-3), (centres, expected)
        assert all(abs(float(ds.SliceThickness) - 1.25) < 1e-3 for ds in d.datasets)


def test_crashed_child_is_retried_and_completes(tmp_path: Path) -> None:
    import signal

    ct = make_ct_series(tmp_path / "ct", n_slices=24, rows=256)
    cfg = node_config(tmp_path, worker={"max_attempts": 3, "backoff_base_seconds": 0.5},
                      rules=[{"name": "r", "modalities": ["CT"]}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out

        def running_child():  # noqa: ANN202
            jobs = queue.list_jobs()
            if not jobs or jobs[0]["stage"] not in ("loading", "enhancing"):
                return None
            return next((p for p in multiprocessing.active_children()
                         if p.name == f"srnode-job-{jobs[0]['id']}" and p.is_alive()), None)

        child = _poll(running_child, interval=0.02)
        os.kill(child.pid, signal.SIGKILL)
        job = _poll(lambda: next((j for j in queue.list_jobs() if j["state"] == "done"), None),
                    timeout=180)
    assert job["attempts"] == 2, job
    crashed = [h for h in job["history"] if "exited with code" in (h.get("error") or "")]
    assert crashed and "-9" in crashed[0]["error"], job["history"]


def test_derived_series_is_published_by_its_manifest_written_last(
    tmp_path: Path, monkeypatch  # noqa: ANN001
) -> None:
    import json

    from dicom_node import worker
    from storage.filestore import FileStore as Store

    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=32)
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["CT"]}])
    with running_node(cfg, run_worker=False) as node:
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        queue = worker.job_queue(cfg, node.db)
        _poll(lambda: queue.list_jobs())
        job = queue.claim("test-worker", 60)
        assert job is not None
        out_dir = worker.job_output_dir(cfg, job.id)
        real = Store.write_atomic
        written: list[str] = []

        def crash_on_third(self, path, data):  # noqa: ANN001, ANN202
            if len(written) == 2:
                raise OSError("simulated crash while writing the derived series")
            written.append(Path(path).name)
            return real(self, path, data)

        monkeypatch.setattr(Store, "write_atomic", crash_on_third)
        try:
            worker._derive_or_reuse(cfg, job, queue, "test-worker", node.db, {})
        except OSError:
            pass
        else:
            raise AssertionError("the simulated crash did not happen")
        assert not (out_dir / worker.MANIFEST).exists()  # nothing published
        monkeypatch.setattr(Store, "write_atomic", real)
        paths, summary = worker._derive_or_reuse(cfg, job, queue, "test-worker", node.db, {})
        manifest = json.loads((out_dir / worker.MANIFEST).read_text())
        assert sorted(manifest["files"]) == sorted(p.name for p in paths)
        assert len(paths) == len(ct) and all(p.exists() for p in paths)
        # every file the manifest names belongs to one derived series
        import pydicom

        series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                  for p in paths}
        assert series == {summary["derived_series_instance_uid"]}


def test_stored_originals_are_never_modified_by_processing(tmp_path: Path) -> None:
    import hashlib

    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=32)
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["CT"]}])
    with running_node(cfg, run_worker=True) as node:
        queue = JobQueue(node.db)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        from sqlalchemy import select

        from storage.models import Instance

        with node.db.session() as s:
            stored = [Path(p) for (p,) in s.execute(select(Instance.path)).all()]
        before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                  for p in stored}
        _poll(lambda: next((j for j in queue.list_jobs() if j["state"] == "done"), None))
    assert len(stored) == len(ct)
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
             for p in stored}
    assert after == before
