from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage.completeness import CompletenessScheduler, check_completeness
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import mark_produced_series, store_instance
from storage.jobs import JobQueue
from storage.rules import Rule
from tests.support import db as db_support
from tests.support.db import synthetic_instance
from tests.support.headers import read_header

db_url = db_support.db_url
database = db_support.database

STUDY = "1.2.826.0.1.3680043.8.498.9"
CT_RULE = Rule(name="ct", modalities=("CT",))


def _series(i: int) -> str:
    return f"{STUDY}.{i}"


def _add(db: Database, store: FileStore, series: str, numbers: range | list[int],
         received_at: datetime | None = None, **kw: object) -> None:
    for k in numbers:
        data = synthetic_instance(STUDY, series, f"{series}.{k}", instance_number=k, **kw)
        store_instance(db, store, read_header(data), data, "MOD", received_at)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def test_quiet_period_creates_job_then_new_instance_supersedes(
    database: Database, store: FileStore
) -> None:
    q = JobQueue(database)
    t0 = datetime.now(UTC)
    _add(database, store, _series(1), range(1, 4), received_at=t0)
    quiet = 30.0  # seconds; the clock is injected, so nothing sleeps
    assert check_completeness(database, [CT_RULE], quiet, 3600,
                              now=t0 + timedelta(seconds=29)) == []  # still arriving
    first = check_completeness(database, [CT_RULE], quiet, 3600, now=t0 + timedelta(seconds=31))
    assert len(first) == 1
    job = q.get(first[0])
    assert (job["state"], job["rule"], job["series_instance_uid"]) == (
        "queued", "ct", _series(1))
    assert job["instance_count"] == 3
    assert job["params"] == CT_RULE.job_params().to_json()
    assert check_completeness(database, [CT_RULE], quiet, 3600,
                              now=t0 + timedelta(seconds=32)) == []  # never duplicated

    t1 = t0 + timedelta(seconds=40)
    _add(database, store, _series(1), [4], received_at=t1)
    assert check_completeness(database, [CT_RULE], quiet, 3600,
                              now=t1 + timedelta(seconds=29)) == []  # not quiet yet
    second = check_completeness(database, [CT_RULE], quiet, 3600, now=t1 + timedelta(seconds=31))
    assert len(second) == 1 and second != first
    assert q.get(first[0])["state"] == "superseded"
    assert q.get(second[0])["state"] == "queued" and q.get(second[0])["instance_count"] == 4
    assert check_completeness(database, [CT_RULE], quiet, 3600,
                              now=t1 + timedelta(seconds=32)) == []
    assert [j["id"] for j in q.list_jobs(["queued"])] == second


def test_running_job_waits_then_fresh_job(database: Database, store: FileStore) -> None:
    q = JobQueue(database)
    t0 = datetime.now(UTC) - timedelta(seconds=100)
    _add(database, store, _series(1), range(1, 3), received_at=t0)
    (job_id,) = check_completeness(database, [CT_RULE], 10, 3600)
    assert q.claim("w", 600) is not None
    _add(database, store, _series(1), [3])
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert check_completeness(database, [CT_RULE], 10, 3600, now=later) == []  # running: wait
    assert q.get(job_id)["state"] == "running"
    q.complete(job_id, "w", {})
    (fresh,) = check_completeness(database, [CT_RULE], 10, 3600, now=later)
    assert q.get(job_id)["state"] == "done"  # its output was sent; stays done
    assert q.get(fresh)["instance_count"] == 3


def test_failed_or_held_job_superseded(database: Database, store: FileStore) -> None:
    q = JobQueue(database)
    t0 = datetime.now(UTC) - timedelta(seconds=100)
    _add(database, store, _series(1), [1], received_at=t0)
    (job_id,) = check_completeness(database, [CT_RULE], 10, 3600)
    assert q.claim("w", 60) is not None
    q.hold(job_id, "w", "gate")
    _add(database, store, _series(1), [2], received_at=t0 + timedelta(seconds=50))
    (fresh,) = check_completeness(database, [CT_RULE], 10, 3600)
    assert q.get(job_id)["state"] == "superseded" and q.get(fresh)["state"] == "queued"


def test_max_age_forces_growing_series(database: Database, store: FileStore) -> None:
    q = JobQueue(database)
    now = datetime.now(UTC)
    _add(database, store, _series(1), [1], received_at=now - timedelta(seconds=120))
    _add(database, store, _series(1), [2], received_at=now)  # still growing
    assert check_completeness(database, [CT_RULE], 30, 3600, now=now) == []
    (forced,) = check_completeness(database, [CT_RULE], 30, 100, now=now)
    assert q.get(forced)["instance_count"] == 2
    # Keeps growing: no second job until it is quiet.
    _add(database, store, _series(1), [3], received_at=now + timedelta(seconds=5))
    assert check_completeness(database, [CT_RULE], 30, 100,
                              now=now + timedelta(seconds=10)) == []
    (quiet,) = check_completeness(database, [CT_RULE], 30, 100, now=now + timedelta(seconds=40))
    assert q.get(forced)["state"] == "superseded"
    assert q.get(quiet)["instance_count"] == 3


def test_derived_and_produced_series_never_queued(database: Database, store: FileStore) -> None:
    past = datetime.now(UTC) - timedelta(hours=2)
    _add(database, store, _series(1), [1], past, image_type=("DERIVED", "SECONDARY"))
    _add(database, store, _series(2), [1], past, image_type=("ORIGINAL", "SECONDARY", "SRNODE"))
    mark_produced_series(database, _series(3))  # ImageType altered by a PACS on the way back
    _add(database, store, _series(3), [1], past, image_type=("ORIGINAL", "PRIMARY"))
    _add(database, store, _series(4), [1], past)  # marked after it arrived
    mark_produced_series(database, _series(4))
    _add(database, store, _series(5), [1], past)  # an ordinary series: the control
    created = check_completeness(database, [Rule(name="any")], 1, 60)
    assert [JobQueue(database).get(j)["series_instance_uid"] for j in created] == [_series(5)]


def test_rule_matching(database: Database, store: FileStore) -> None:
    q = JobQueue(database)
    past = datetime.now(UTC) - timedelta(hours=1)
    _add(database, store, _series(1), range(1, 4), past, modality="CT", body_part="CHEST",
         series_description="Thorax 1mm")
    _add(database, store, _series(2), range(1, 4), past, modality="MR", body_part="HEAD",
         series_description="T1 MPRAGE")
    _add(database, store, _series(3), [1], past, modality="MR", body_part="HEAD",
         series_description="T2 localizer")
    rules = [
        Rule(name="ct-chest", modalities=("CT",), body_parts=("chest",)),
        Rule(name="mr-t1", modalities=("MR",), series_description=r"t1|mprage", min_instances=2),
        Rule(name="mr-any-3", modalities=("MR",), min_instances=3),
        Rule(name="ct-abdomen", modalities=("CT",), body_parts=("ABDOMEN",)),
    ]
    created = check_completeness(database, rules, 1, 60)
    got = sorted((q.get(j)["series_instance_uid"], q.get(j)["rule"]) for j in created)
    assert got == [(_series(1), "ct-chest"), (_series(2), "mr-any-3"), (_series(2), "mr-t1")]
    assert check_completeness(database, rules, 1, 60) == []
    # The localizer grows to 3 instances: now mr-any-3 matches it.
    _add(database, store, _series(3), [2, 3], past + timedelta(seconds=1))
    created = check_completeness(database, rules, 1, 60)
    assert [(q.get(j)["series_instance_uid"], q.get(j)["rule"]) for j in created] == [
        (_series(3), "mr-any-3")]


def test_rule_quiet_period_overrides_default(database: Database, store: FileStore) -> None:
    now = datetime.now(UTC)
    _add(database, store, _series(1), [1], now - timedelta(seconds=20))
    slow = Rule(name="slow", modalities=("CT",), quiet_period_seconds=60)
    fast = Rule(name="fast", modalities=("CT",), quiet_period_seconds=5)
    created = check_completeness(database, [slow, fast], 10, 3600, now=now)
    assert [JobQueue(database).get(j)["rule"] for j in created] == ["fast"]
    created = check_completeness(database, [slow, fast], 10, 3600,
                                 now=now + timedelta(seconds=45))
    assert [JobQueue(database).get(j)["rule"] for j in created] == ["slow"]


def test_scheduler_runs_in_background(database: Database, store: FileStore) -> None:
    _add(database, store, _series(1), [1])
    sched = CompletenessScheduler(database, [CT_RULE], default_quiet_period=0.3, max_age=3600,
                                  interval_seconds=0.2, max_attempts=4)
    sched.start()
    try:
        deadline = time.monotonic() + 30
        while not JobQueue(database).list_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sched.shutdown()
    jobs = JobQueue(database).list_jobs()
    assert len(jobs) == 1 and jobs[0]["max_attempts"] == 4
    assert not sched.running
    assert sched.run_once() == []


def test_series_on_an_open_association_is_not_quiet(database: Database, store: FileStore) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=600)
    _add(database, store, _series(1), [1, 2], received_at=t0)
    _add(database, store, _series(2), [1], received_at=t0)
    later = t0 + timedelta(seconds=60)  # long past the quiet period
    created = check_completeness(database, [CT_RULE], 10, 3600, now=later,
                                 receiving={_series(1)})
    assert [JobQueue(database).get(j)["series_instance_uid"] for j in created] == [_series(2)]
    # the association ended: the series is complete now
    (job,) = check_completeness(database, [CT_RULE], 10, 3600, now=later, receiving=set())
    assert JobQueue(database).get(job)["series_instance_uid"] == _series(1)
    # max_age still forces a series whose sender never lets go
    _add(database, store, _series(3), [1], received_at=t0)
    (forced,) = check_completeness(database, [CT_RULE], 10, 30, now=later,
                                   receiving={_series(3)})
    assert JobQueue(database).get(forced)["series_instance_uid"] == _series(3)
