from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from storage.db import Database
from storage.errors import InvalidJobStateError, JobNotFoundError
from storage.filestore import FileStore
from storage.ingest import store_instance
from storage.job_types import BackoffPolicy, JobParams
from storage.jobs import JobQueue
from storage.models import Job
from tests.support import db as db_support
from tests.support.db import synthetic_instance
from tests.support.headers import read_header

db_url = db_support.db_url
database = db_support.database

STUDY = "1.2.826.0.1.3680043.8.498.7"


def _series(i: int) -> str:
    return f"{STUDY}.{i}"


def _ingest(db: Database, store: FileStore, series: str, n: int, modality: str = "CT") -> None:
    # Stored in reverse instance order so sorting by instance number is visible.
    for k in range(n, 0, -1):
        data = synthetic_instance(STUDY, series, f"{series}.{k}", instance_number=k,
                                  modality=modality)
        store_instance(db, store, read_header(data), data, "MOD")


def _expire_lease(db: Database, job_id: int) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))


def _make_due(db: Database, job_id: int) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            not_before=datetime.now(UTC) - timedelta(seconds=1)))


@pytest.fixture
def queue_with_series(database: Database, tmp_path: Path) -> tuple[JobQueue, FileStore]:
    store = FileStore(tmp_path)
    _ingest(database, store, _series(1), 3)
    return JobQueue(database), store


def test_enqueue_claim_complete(queue_with_series: tuple[JobQueue, FileStore]) -> None:
    q, store = queue_with_series
    job_id = q.enqueue(_series(1), "ct-x2", JobParams(mode="slice", scale=2))
    assert q.get(job_id)["state"] == "queued"
    claimed = q.claim("w1", lease_seconds=60)
    assert claimed is not None and claimed.id == job_id
    assert (claimed.rule, claimed.params, claimed.attempts) == (
        "ct-x2", JobParams(mode="slice", scale=2), 1)
    assert claimed.instance_paths == [store.instance_path(STUDY, _series(1), f"{_series(1)}.{k}")
                                      for k in (1, 2, 3)]
    assert q.claim("w2", lease_seconds=60) is None
    assert q.heartbeat(job_id, "w1", 60)
    assert not q.heartbeat(job_id, "w2", 60)
    q.set_stage(job_id, "w1", "inference", {"load": 0.5})
    q.set_stage(job_id, "w1", "send", {"inference": 2.0})
    with pytest.raises(InvalidJobStateError):
        q.set_stage(job_id, "w2", "send")
    q.complete(job_id, "w1", {"derived_series_uid": "1.2.3"})
    job = q.get(job_id)
    assert job["state"] == "done" and job["result"] == {"derived_series_uid": "1.2.3"}
    assert job["stage_seconds"] == {"load": 0.5, "inference": 2.0}
    assert job["modality"] == "CT" and job["series_description"] == "Thorax 5mm"
    assert not q.heartbeat(job_id, "w1", 60)
    with pytest.raises(InvalidJobStateError):
        q.complete(job_id, "w1", {})
    with pytest.raises(JobNotFoundError):
        q.enqueue("9.9.9", "r", JobParams())
    with pytest.raises(JobNotFoundError):
        q.get(123456)


def test_list_jobs_shape_and_filter(queue_with_series: tuple[JobQueue, FileStore]) -> None:
    q, _ = queue_with_series
    a = q.enqueue(_series(1), "a", JobParams())
    b = q.enqueue(_series(1), "b", JobParams())
    claimed = q.claim("w", 60)
    assert claimed is not None and claimed.id == a  # oldest first
    jobs = q.list_jobs()
    assert [j["id"] for j in jobs] == [b, a]
    keys = {"id", "series_instance_uid", "modality", "series_description", "state", "attempts",
            "error", "rule", "stage", "stage_seconds", "created_at", "updated_at", "result"}
    assert keys <= set(jobs[0])
    datetime.fromisoformat(jobs[0]["created_at"])
    assert [j["id"] for j in q.list_jobs(["running"])] == [a]
    assert q.list_jobs(["failed"]) == []
    assert len(q.list_jobs(limit=1)) == 1
    assert q.counts()["queued"] == 1 and q.counts()["running"] == 1
    with pytest.raises(ValueError):
        q.list_jobs(["bogus"])


def test_two_workers_race_each_job_claimed_once(database: Database, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    _ingest(database, store, _series(1), 1)
    q = JobQueue(database)
    n_jobs = 50
    ids = {q.enqueue(_series(1), f"r{i}", JobParams()) for i in range(n_jobs)}
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        db = Database(database.url)
        wq = JobQueue(db)
        try:
            barrier.wait()
            while (job := wq.claim(name, lease_seconds=300)) is not None:
                with lock:
                    claims.append((name, job.id))
                wq.complete(job.id, name, {"by": name})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = Counter(job_id for _, job_id in claims)
    assert set(counts) == ids
    assert set(counts.values()) == {1}
    assert all(j["state"] == "done" and j["attempts"] == 1 for j in q.list_jobs())
    # Each job's result names the worker that claimed it.
    by = {j["id"]: j["result"]["by"] for j in q.list_jobs()}
    assert by == {job_id: name for name, job_id in claims}


def _process_worker(url: str, name: str, out: object) -> None:
    db = Database(url)
    q = JobQueue(db)
    try:
        while (job := q.claim(name, lease_seconds=300)) is not None:
            out.put((name, job.id))  # type: ignore[attr-defined]
            q.complete(job.id, name, {"by": name})
    finally:
        db.dispose()
        out.put((name, None))  # type: ignore[attr-defined]


def test_two_worker_processes_race(database: Database, tmp_path: Path) -> None:
    import multiprocessing

    store = FileStore(tmp_path)
    _ingest(database, store, _series(1), 1)
    q = JobQueue(database)
    ids = {q.enqueue(_series(1), f"r{i}", JobParams()) for i in range(50)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(database.url, f"p{i}", out))
             for i in range(2)]
    for p in procs:
        p.start()
    claims: list[int] = []
    finished = 0
    while finished < len(procs):
        _name, job_id = out.get(timeout=120)
        if job_id is None:
            finished += 1
        else:
            claims.append(job_id)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(claims) == sorted(ids)
    assert all(j["state"] == "done" and j["attempts"] == 1 for j in q.list_jobs())


def test_lease_expiry_takeover(queue_with_series: tuple[JobQueue, FileStore]) -> None:
    q, _ = queue_with_series
    job_id = q.enqueue(_series(1), "r", JobParams(), max_attempts=3)
    assert q.claim("dead", lease_seconds=60) is not None
    assert q.claim("alive", lease_seconds=60) is None  # lease still valid
    _expire_lease(q.db, job_id)
    taken = q.claim("alive", lease_seconds=60)
    assert taken is not None and taken.id == job_id and taken.attempts == 2
    assert not q.heartbeat(job_id, "dead", 60)
    with pytest.raises(InvalidJobStateError):
        q.complete(job_id, "dead", {})
    q.complete(job_id, "alive", {})
    assert q.get(job_id)["worker_id"] == "alive"


def test_lease_expired_on_last_attempt_is_dead_lettered(
    queue_with_series: tuple[JobQueue, FileStore],
) -> None:
    q, _ = queue_with_series
    job_id = q.enqueue(_series(1), "r", JobParams(), max_attempts=1)
    assert q.claim("dead", lease_seconds=60) is not None
    _expire_lease(q.db, job_id)
    assert q.claim("other", lease_seconds=60) is None
    job = q.get(job_id)
    assert job["state"] == "failed" and "lease expired" in job["error"]


def test_backoff_then_dead_letter_then_retry(
    queue_with_series: tuple[JobQueue, FileStore],
) -> None:
    q, _ = queue_with_series
    q = JobQueue(q.db, BackoffPolicy(base_seconds=10, max_seconds=15))
    job_id = q.enqueue(_series(1), "r", JobParams(), max_attempts=3)
    delays = []
    for attempt in (1, 2):
        job = q.claim("w", 60)
        assert job is not None and job.attempts == attempt
        before = datetime.now(UTC)
        assert q.fail(job_id, "w", f"error {attempt}") == "queued"
        got = q.get(job_id)
        assert got["state"] == "queued" and got["error"] == f"error {attempt}"
        delays.append((datetime.fromisoformat(got["not_before"]) - before).total_seconds())
        assert q.claim("w", 60) is None  # backing off
        _make_due(q.db, job_id)
    assert 9 <= delays[0] <= 11 and 14 <= delays[1] <= 16  # 10 * 2**0, min(15, 10 * 2**1)
    job = q.claim("w", 60)
    assert job is not None and job.attempts == 3
    assert q.fail(job_id, "w", "error 3") == "failed"
    assert q.claim("w", 60) is None
    failed = q.get(job_id)
    assert failed["state"] == "failed" and failed["error"] == "error 3"

    q.retry(job_id)
    again = q.get(job_id)
    assert again["state"] == "queued" and again["attempts"] == 0 and again["error"] is None
    assert any(h.get("error") == "error 3" for h in again["history"])
    assert q.claim("w", 60) is not None
    with pytest.raises(InvalidJobStateError):
        q.retry(job_id)  # running
    with pytest.raises(JobNotFoundError):
        q.retry(987654)


def test_non_retryable_failure_and_hold(queue_with_series: tuple[JobQueue, FileStore]) -> None:
    q, _ = queue_with_series
    a = q.enqueue(_series(1), "a", JobParams(), max_attempts=5)
    b = q.enqueue(_series(1), "b", JobParams())
    assert q.claim("w", 60).id == a  # type: ignore[union-attr]
    assert q.fail(a, "w", "corrupt input", retryable=False) == "failed"
    assert q.claim("w", 60).id == b  # type: ignore[union-attr]
    q.hold(b, "w", "consistency gate: PSNR 20 dB", {"psnr": 20.0})
    held = q.get(b)
    assert held["state"] == "held" and held["result"] == {"psnr": 20.0}
    assert "PSNR" in held["error"]
    q.retry(b)
    assert q.get(b)["state"] == "queued"


def test_backoff_formula() -> None:
    assert [BackoffPolicy(30, 1800).delay(a) for a in range(1, 9)] == [
        30, 60, 120, 240, 480, 960, 1800, 1800]


def test_sent_instances(queue_with_series: tuple[JobQueue, FileStore]) -> None:
    q, _ = queue_with_series
    job_id = q.enqueue(_series(1), "r", JobParams())
    assert q.sent_instances(job_id, "PACS") == set()
    q.record_sent(job_id, "PACS", "1.2.3.1")
    q.record_sent(job_id, "PACS", "1.2.3.1")  # idempotent
    q.record_sent(job_id, "PACS", "1.2.3.2")
    q.record_sent(job_id, "ARCHIVE", "1.2.3.1")
    assert q.sent_instances(job_id, "PACS") == {"1.2.3.1", "1.2.3.2"}
    assert q.sent_instances(job_id, "ARCHIVE") == {"1.2.3.1"}
    with pytest.raises(JobNotFoundError):
        q.record_sent(999999, "PACS", "1.2")
