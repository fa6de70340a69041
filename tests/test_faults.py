"""Fault injection with real processes and real signals: kill -9 of ``srnode serve`` while it
receives, enhances and sends; a dead worker's job taken over after its lease (SQLite and
PostgreSQL); the index database locked; the disk floor reached mid-series.

A destination that is down for a while and comes back (delivered after it returns, with
backoff, other destinations served meanwhile) is covered by
``tests/test_worker.py::test_destination_down_then_up_is_delivered_and_others_are_served``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage

from dicom_node.network import statuses
from storage.db import Database
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support import db as db_support
from tests.support.dcmtk import StoreSCP, echoscu, storescu
from tests.support.faults import (
    RecordingSender,
    ServedNode,
    StorescuSender,
    indexed_instances,
    orthanc_series_counts,
    scu_ae,
    send_on_one_association,
    sqlite_exclusive_lock,
    storage_problems,
    wait_for_jobs,
)
from tests.support.node import node_config, running_node
from tests.support.orthanc import OrthancServer

FINISHED = ("done", "failed", "held")


def _dest(name: str, ae: str, port: int) -> dict[str, object]:
    """A ``[[destinations]]`` entry on loopback."""
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port}


def _uid(path: Path) -> str:
    """SOP Instance UID of a file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _series_uid(path: Path) -> str:
    """Series Instance UID of a file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _audit(node: ServedNode) -> list[dict]:
    """The node's audit log entries."""
    path = Path(str(node.data["node"]["audit_log"]))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _queue(url: str) -> tuple[Database, JobQueue]:
    """A separate connection to the node's job queue (dispose the database afterwards)."""
    db = Database(url)
    return db, JobQueue(db)


# -- 1a: kill -9 while an association is sending -----------------------------------------------
@pytest.mark.parametrize("sender_kind", ["pynetdicom", "storescu"])
def test_kill9_while_receiving_keeps_every_acknowledged_instance(
    tmp_path: Path, sender_kind: str
) -> None:
    """Every instance acknowledged before the kill is on disk and indexed after a restart."""
    ct = make_ct_series(tmp_path / "ct", n_slices=200, rows=16)
    by_path = {p: _uid(p) for p in ct}
    node = ServedNode(tmp_path)
    node.start()
    try:
        if sender_kind == "pynetdicom":
            sender = RecordingSender(node.port, ct)
            sender.start()

            def acknowledged() -> set[str]:
                return sender.acknowledged()
        else:
            scu = StorescuSender(node.port, ct, tmp_path / "storescu.log").start()

            def acknowledged() -> set[str]:
                return {by_path[p] for p in scu.acknowledged()}
        deadline = time.monotonic() + 60
        while len(acknowledged()) < 60 and time.monotonic() < deadline:
            time.sleep(0.005)
        node.kill9()
        if sender_kind == "pynetdicom":
            sender.join(timeout=60)
            assert not sender.is_alive()
            assert None in sender.statuses.values() or sender.error  # the association died
        else:
            assert scu.wait(60) != 0, scu.output()[-2000:]  # storescu saw the association die
        done = acknowledged()
        assert 60 <= len(done) < len(ct), len(done)

        node.start()  # restart: clean-up of interrupted writes, then serve again
        indexed = indexed_instances(node.database_url)
        missing = done - set(indexed)
        assert not missing, f"{len(missing)} acknowledged instance(s) lost"
        for uid in done:
            assert indexed[uid].is_file()
            assert str(pydicom.dcmread(indexed[uid]).SOPInstanceUID) == uid
        assert storage_problems(node.storage_dir) == []
        # nothing that was not acknowledged is indexed except the one possibly in flight
        assert len(set(indexed) - done) <= 1

        # the node serves again: the rest of the series is stored
        rest = [p for p in ct if by_path[p] not in done]
        assert send_on_one_association(node.port, rest) == [0] * len(rest)
        rc, out = echoscu("127.0.0.1", node.port, called_ae_title="SRNODE")
        assert rc == 0, out
        assert set(indexed_instances(node.database_url)) == set(by_path.values())
        assert storage_problems(node.storage_dir) == []
    finally:
        node.stop()


# -- 1b / 1c: kill -9 while a job is enhancing or sending --------------------------------------
def _pacs_node(tmp_path: Path, pacs: OrthancServer) -> ServedNode:
    """A node with a 3 s lease whose CT x2 rule sends to Orthanc."""
    return ServedNode(
        tmp_path,
        worker={"lease_seconds": 3.0, "heartbeat_seconds": 0.5, "backoff_base_seconds": 0.5,
                "max_attempts": 3},
        destinations=[_dest("pacs", "ORTHANC", pacs.dicom_port)],
        rules=[{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                "model": "fast", "destinations": ["pacs"]}],
    )


def _kill_at_stage_then_finish(tmp_path: Path, ct: list[Path], stage: str,
                               min_sent: int = 0) -> None:
    """Send ``ct``, kill -9 the node when its job is at ``stage``, restart, check Orthanc.

    With ``min_sent`` the kill waits until that many derived instances were acknowledged.
    """
    with OrthancServer(tmp_path / "orthanc") as pacs:
        node = _pacs_node(tmp_path, pacs)
        node.start()
        db, queue = _queue(node.database_url)
        try:
            rc, out = storescu("127.0.0.1", node.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out

            def at_stage(jobs: list[dict]) -> bool:
                job = jobs[0]
                if job["state"] != "running" or job["stage"] != stage:
                    return False
                return len(queue.sent_instances(job["id"], "pacs")) >= min_sent

            job = wait_for_jobs(queue, at_stage, timeout=120, interval=0.05,
                                what=f"stage {stage}")[0]
            node.kill9()
            killed_at = queue.get(job["id"])
            assert killed_at["state"] == "running" and killed_at["attempts"] == 1
            if min_sent:  # killed mid-way through the series, not before or after it
                assert min_sent <= len(queue.sent_instances(job["id"], "pacs")) < len(ct)
            node.start()
            jobs = wait_for_jobs(queue, lambda j: j[0]["state"] in FINISHED, timeout=120,
                                 what="job finished after restart")
        finally:
            node.stop()
            db.dispose()
        assert jobs[0]["state"] == "done", (jobs[0], node.log()[-3000:])
        assert jobs[0]["attempts"] == 2  # taken over once, after the lease expired
        derived_uid = jobs[0]["result"]["derived_series_instance_uid"]
        counts = orthanc_series_counts(pacs)  # the source went from storescu to srnode only
        assert counts == {derived_uid: len(ct)}, counts  # exactly one derived series
        assert derived_uid != _series_uid(ct[0])
        assert len(pacs.instances()) == len(ct)  # no duplicated instance
        sent = [e for e in _audit(node) if e["event"] == "series_sent"]
        assert len(sent) == 1 and sent[0]["sent"] + sent[0]["skipped"] == len(ct)
        if min_sent:  # the restarted attempt sent only what the killed one had not
            assert sent[0]["skipped"] >= min_sent


def test_kill9_while_enhancing_completes_after_the_lease_expires(tmp_path: Path) -> None:
    """Killed while enhancing: retried after the lease, exactly one derived series arrives."""
    ct = make_ct_series(tmp_path / "ct", n_slices=40, rows=256)
    _kill_at_stage_then_finish(tmp_path, ct, "enhancing")


def test_kill9_while_sending_leaves_one_copy_of_the_derived_series(tmp_path: Path) -> None:
    """Killed mid-send: the retry re-sends only the rest of the same series, one copy in all."""
    ct = make_ct_series(tmp_path / "ct", n_slices=120, rows=64)
    _kill_at_stage_then_finish(tmp_path, ct, "sending", min_sent=10)


# -- 2: a dead worker's claimed job is taken over after its lease expires ----------------------
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_stale_job_of_a_killed_worker_is_taken_over_by_the_other(
    tmp_path: Path, backend: str
) -> None:
    """Two ``srnode serve`` on one database: kill the job's owner, the other finishes it."""
    ct = make_ct_series(tmp_path / "ct", n_slices=6, rows=64)
    with db_support.fresh_database_url(backend, tmp_path) as url, \
            StoreSCP(tmp_path / "archive") as archive:
        common = {
            "worker": {"lease_seconds": 3.0, "heartbeat_seconds": 0.5,
                       "backoff_base_seconds": 0.5, "max_attempts": 3},
            "destinations": [_dest("archive", "STORESCP", archive.port)],
            # an interpolation model: this test is about the lease, not the network weights
            "rules": [{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                       "model": "cubic", "destinations": ["archive"]}],
        }
        nodes = [
            ServedNode(tmp_path, name, node={"database_url": url,
                                             "audit_log": str(tmp_path / f"{name}-audit.log"),
                                             "log_file": str(tmp_path / f"{name}.log")},
                       **common)
            for name in ("a", "b")
        ]
        db, queue = _queue(url)
        try:
            for n in nodes:
                n.start()
            rc, out = storescu("127.0.0.1", nodes[0].port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            job = wait_for_jobs(queue, lambda j: j[0]["state"] == "running", timeout=60,
                                interval=0.05, what="job claimed")[0]
            owner = next(n for n in nodes if f":{n.pid}:" in str(job["worker_id"]))
            survivor = next(n for n in nodes if n is not owner)
            owner.kill9()
            assert queue.get(job["id"])["state"] == "running"  # still leased to the dead one
            jobs = wait_for_jobs(queue, lambda j: j[0]["state"] in FINISHED, timeout=120,
                                 what="job finished by the surviving worker")
        finally:
            for n in nodes:
                n.stop()
            db.dispose()
        assert len(jobs) == 1, jobs  # two schedulers on one database queued the series once
        done = jobs[0]
        assert done["state"] == "done", (done, survivor.log()[-3000:])
        assert done["attempts"] == 2
        assert f":{survivor.pid}:" in str(done["worker_id"])
        received = archive.files()
        series = {_series_uid(f) for f in received}
        assert series == {done["result"]["derived_series_instance_uid"]}
        assert len(received) == len(ct)


# -- 4: the index database locked ------------------------------------------------------------
def test_locked_database_answers_a701_and_storing_works_after_the_lock_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index locked past the busy timeout: 0xA701, nothing acknowledged unindexed; then OK."""
    # [node] index_busy_timeout_seconds must stay below senders' DIMSE timeouts (this test's
    # sender: 15 s) so that the SCP answers a failure status they can retry.
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=16)
    uids = [_uid(p) for p in ct]
    cfg = node_config(tmp_path, node={"index_busy_timeout_seconds": 1.5})
    db_path = Path(cfg.node.database_url.removeprefix("sqlite:///"))
    with running_node(cfg) as node:
        assert send_on_one_association(node.scp.port, ct[:1]) == [0]
        with sqlite_exclusive_lock(db_path):
            locked = send_on_one_association(node.scp.port, ct[1:])
        assert locked == [statuses.OUT_OF_RESOURCES_INDEX] * 2
        indexed = indexed_instances(cfg.node.database_url)
        assert set(indexed) == {uids[0]}  # nothing acknowledged that is not indexed
        assert storage_problems(Path(cfg.node.storage_dir)) == []
        # the lock is gone: the sender's retry is stored and indexed
        assert send_on_one_association(node.scp.port, ct[1:]) == [0, 0]
        indexed = indexed_instances(cfg.node.database_url)
        assert set(indexed) == set(uids)
        for uid in uids:
            assert str(pydicom.dcmread(indexed[uid]).SOPInstanceUID) == uid
    audit = Path(cfg.node.audit_log).read_text()
    assert audit.count('"instance_refused"') == 2 and "0xA701" in audit


def test_briefly_locked_database_is_waited_for(tmp_path: Path) -> None:
    """A lock shorter than the busy timeout delays the answer; every instance is stored."""
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    cfg = node_config(tmp_path)
    db_path = Path(cfg.node.database_url.removeprefix("sqlite:///"))
    with running_node(cfg) as node:
        release = threading.Event()
        held = threading.Event()

        def hold() -> None:
            with sqlite_exclusive_lock(db_path):
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert held.wait(10)
        sender = RecordingSender(node.scp.port, ct)
        sender.start()
        time.sleep(1.0)  # the SCP is now waiting for the lock
        assert sender.statuses == {}  # not acknowledged while it cannot index
        release.set()
        sender.join(30)
        holder.join(10)
        assert sender.acknowledged() == {_uid(p) for p in ct}, sender.statuses
        assert set(indexed_instances(cfg.node.database_url)) == {_uid(p) for p in ct}


# -- 5: disk floor reached mid-series ------------------------------------------------------
def test_disk_floor_mid_series_refuses_keeps_and_resumes(tmp_path: Path) -> None:
    """Floor reached mid-association: 0xA700, stored files intact; resent later and processed."""
    ct = make_ct_series(tmp_path / "ct", n_slices=10, rows=32)
    uids = [_uid(p) for p in ct]
    with StoreSCP(tmp_path / "archive") as archive:
        cfg = node_config(
            tmp_path,
            series={"quiet_period_seconds": 5.0},
            destinations=[_dest("archive", "STORESCP", archive.port)],
            rules=[{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                    "model": "cubic", "destinations": ["archive"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            ae = scu_ae()
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE")
            assert assoc.is_established
            try:
                first = [int(assoc.send_c_store(p).Status) for p in ct[:5]]
                free_mb = shutil.disk_usage(cfg.node.storage_dir).free // (1024 * 1024)
                cfg.node.min_free_disk_mb = free_mb + 10_000  # the floor is reached
                refused = [int(assoc.send_c_store(p).Status) for p in ct[5:]]
                assert set(indexed_instances(cfg.node.database_url)) == set(uids[:5])
                assert storage_problems(Path(cfg.node.storage_dir)) == []
                cfg.node.min_free_disk_mb = 1  # space is back
                resent = [int(assoc.send_c_store(p).Status) for p in ct[5:]]
            finally:
                assoc.release()
            assert first == [0] * 5
            assert refused == [statuses.OUT_OF_RESOURCES] * 5
            assert resent == [0] * 5
            indexed = indexed_instances(cfg.node.database_url)
            assert set(indexed) == set(uids)
            for uid in uids:
                assert str(pydicom.dcmread(indexed[uid]).SOPInstanceUID) == uid
            jobs = wait_for_jobs(JobQueue(node.db),
                                 lambda j: j[0]["state"] in FINISHED, timeout=90)
        assert [j["state"] for j in jobs] == ["done"], jobs
        assert jobs[0]["instance_count"] == len(ct)
        received = archive.files()
        assert len(received) == len(ct)
        assert {_series_uid(f) for f in received} == {
            jobs[0]["result"]["derived_series_instance_uid"]}
