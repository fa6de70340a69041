"""Retention: exactly the eligible series go, crash-safely, and --dry-run changes nothing.

Series arrive over real loopback associations (dcmtk storescu) at a real node; job states and
ages are then set in the index as the worker and time would have left them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select, update

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.housekeeping import run_purge
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Job, Series, utcnow
from storage.retention import INTENT_DIR
from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support import db as db_support
from tests.support.dcmtk import storescu
from tests.support.node import (
    ROOT,
    node_config,
    node_config_dict,
    running_node,
    srnode_executable,
    write_toml,
)

db_url = db_support.db_url

RULES = [{"name": "ct", "modalities": ["CT"], "mode": "slice", "scale": 2, "destinations": []}]
OLD = timedelta(days=40)
#: series name -> state of its job ("none": an MR series no rule selects)
SCENARIO = {
    "done_old": "done", "done_recent": "done", "queued_old": "queued",
    "running_old": "running", "held_old": "held", "failed_old": "failed", "none_old": "none",
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _populate(tmp: Path, url: str | None = None) -> tuple[Config, dict[str, str], Path]:
    """Receive one small series per scenario and leave jobs and ages as named."""
    sections = {"rules": RULES}
    if url is not None:
        sections["node"] = {"database_url": url}
    data = node_config_dict(tmp, **sections)
    cfg_path = write_toml(data, tmp / "config.toml")
    from dicom_node.config import load_config

    cfg = load_config(cfg_path)
    uids: dict[str, str] = {}
    with running_node(cfg) as node:
        for name, state in SCENARIO.items():
            make = make_mr_series if state == "none" else make_ct_series
            files = make(tmp / "in" / name, n_slices=2, rows=16)
            rc, out = storescu("127.0.0.1", node.scp.port, files, called_ae_title="SRNODE")
            assert rc == 0, out
            uids[name] = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with node.db.session() as s:
                if s.scalar(select(func.count()).select_from(Job)) == len(SCENARIO) - 1:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("completeness check did not queue the CT series")
    db = Database(cfg.node.database_url)
    now = utcnow()
    with db.session() as s:
        for name, state in SCENARIO.items():
            age = timedelta(hours=1) if name.endswith("recent") else OLD
            sid = s.scalar(select(Series.id).where(Series.series_instance_uid == uids[name]))
            s.execute(update(Series).where(Series.id == sid)
                      .values(last_received_at=now - age, first_received_at=now - age))
            if state != "none":
                s.execute(update(Job).where(Job.series_fk == sid)
                          .values(state=state, finished_at=now - age))
        jobs = dict(s.execute(select(Job.series_instance_uid, Job.id)).all())
    db.dispose()
    # derived output of the done (old) job and of the held job
    for name in ("done_old", "held_old"):
        out = Path(cfg.node.storage_dir) / "derived" / f"job-{jobs[uids[name]]}"
        out.mkdir(parents=True)
        (out / "1.2.3.dcm").write_bytes(b"x" * 1000)
        (out / "manifest.json").write_text("{}")
    return cfg, uids, cfg_path


def _snapshot(cfg: Config) -> tuple[dict[str, int], set[str]]:
    """Instance rows per series UID and every file under the storage root."""
    db = Database(cfg.node.database_url)
    with db.session() as s:
        rows = dict(s.execute(
            select(Series.series_instance_uid, func.count(Instance.id))
            .outerjoin(Instance, Instance.series_fk == Series.id)
            .group_by(Series.series_instance_uid)).all())
    db.dispose()
    root = Path(cfg.node.storage_dir)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    return rows, files


def _assert_consistent(cfg: Config) -> None:
    """No orphan: every stored instance file has its row and every row its file."""
    db = Database(cfg.node.database_url)
    with db.session() as s:
        indexed = {Path(p).resolve() for p in s.scalars(select(Instance.path)).all()}
    db.dispose()
    root = Path(cfg.node.storage_dir)
    on_disk = {p.resolve() for p in root.rglob("*.dcm") if "derived" not in p.parts}
    assert on_disk == indexed
    assert not list((root / INTENT_DIR).glob("*.json")) if (root / INTENT_DIR).exists() else True


def _dump(cfg: Config) -> list[str]:
    """Every statement that recreates the SQLite index (its whole content)."""
    import sqlite3

    conn = sqlite3.connect(cfg.node.database_url.removeprefix("sqlite:///"))
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _audit_purged(cfg: Config) -> list[dict]:
    lines = Path(cfg.node.audit_log).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "series_purged"]


def test_age_purges_exactly_the_eligible_series(tmp_path: Path, db_url: str) -> None:
    cfg, uids, _ = _populate(tmp_path, db_url)
    cfg.retention.received_max_age_days = 30
    cfg.retention.derived_max_age_days = 30
    before, _files = _snapshot(cfg)
    assert all(before[u] == 2 for u in uids.values())
    db = Database(cfg.node.database_url)
    report = run_purge(cfg, db, FileStore(Path(cfg.node.storage_dir)),
                       AuditLog(cfg.node.audit_log))
    db.dispose()
    gone = {(i.kind, i.series_instance_uid) for i in report.items}
    assert gone == {("received", uids["done_old"]), ("received", uids["none_old"]),
                    ("derived", uids["done_old"])}
    after, files = _snapshot(cfg)
    for name, uid in uids.items():
        expected = 0 if name in ("done_old", "none_old") else 2
        assert after[uid] == expected, name  # queued/running/held/failed/recent untouched
    derived = {f.split("/")[1] for f in files if f.startswith("derived/")}
    assert len(derived) == 1  # the held job's output stays
    _assert_consistent(cfg)
    audit = _audit_purged(cfg)
    assert {(e["kind"], e["series_instance_uid"]) for e in audit} == gone
    assert all(e["reason"] == "age" for e in audit)
    text = Path(cfg.node.audit_log).read_text()
    assert "Doe" not in text and "PatientName" not in text
    # a second run finds nothing more
    db = Database(cfg.node.database_url)
    assert run_purge(cfg, db, FileStore(Path(cfg.node.storage_dir)),
                     AuditLog(None)
                     ).items == []
    db.dispose()


def test_delete_received_after_done(tmp_path: Path) -> None:
    cfg, uids, cfg_path = _populate(tmp_path)
    data = node_config_dict(tmp_path, rules=RULES, retention={"delete_received_after_done": True})
    data["node"] = {**data["node"], "database_url": cfg.node.database_url,
                    "port": cfg.node.port}
    write_toml(data, cfg_path)
    r = subprocess.run([srnode_executable(), "purge", "--json", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert {(i["kind"], i["series_instance_uid"], i["reason"]) for i in items} == {
        ("received", uids["done_old"], "done"), ("received", uids["done_recent"], "done")}
    after, _ = _snapshot(cfg)
    assert after[uids["done_recent"]] == 0 and after[uids["none_old"]] == 2
    _assert_consistent(cfg)


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    cfg, uids, cfg_path = _populate(tmp_path)
    data = node_config_dict(tmp_path, rules=RULES, retention={
        "received_max_age_days": 30, "derived_max_age_days": 30})
    data["node"] = {**data["node"], "database_url": cfg.node.database_url}
    write_toml(data, cfg_path)
    rows, files = _snapshot(cfg)
    audit = Path(cfg.node.audit_log).read_bytes()
    dump = _dump(cfg)
    r = subprocess.run([srnode_executable(), "purge", "--dry-run", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "would purge 3 item(s)" in r.stdout
    assert uids["done_old"] in r.stdout and uids["none_old"] in r.stdout
    assert uids["queued_old"] not in r.stdout and uids["failed_old"] not in r.stdout
    assert _snapshot(cfg) == (rows, files)
    assert Path(cfg.node.audit_log).read_bytes() == audit
    assert _dump(cfg) == dump


_KILL_AT = {
    # after the intent is written, before any file is deleted
    "before_files": "storage.retention.os.unlink",
    # after the files are deleted, before the index rows go
    "before_rows": "storage.retention.Retention._delete_rows",
    # after files and rows are gone, before the audit entry and the intent's removal
    "before_audit": "storage.retention.Retention._remove_empty_parents",
}

_KILLER = """
import os, signal, sys
from unittest import mock
from dicom_node.cli import main
target = sys.argv[1]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
with mock.patch(target, die):
    main(["purge", "--config", sys.argv[2]])
"""


@pytest.mark.parametrize("point", list(_KILL_AT))
def test_kill9_mid_purge_leaves_no_orphans(tmp_path: Path, point: str) -> None:
    cfg, uids, cfg_path = _populate(tmp_path)
    data = node_config_dict(tmp_path, rules=RULES, retention={"received_max_age_days": 30})
    data["node"] = {**data["node"], "database_url": cfg.node.database_url}
    write_toml(data, cfg_path)
    r = subprocess.run([sys.executable, "-c", _KILLER, _KILL_AT[point], str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    intents = list((Path(cfg.node.storage_dir) / INTENT_DIR).glob("*.json"))
    assert len(intents) == 1  # killed in the middle of the first item
    # the next run finishes it even with retention switched off in the meantime
    data["retention"] = {}
    write_toml(data, cfg_path)
    r = subprocess.run([srnode_executable(), "purge", "--json", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert [i["reason"] for i in json.loads(r.stdout)["items"]] == ["interrupted"]
    _assert_consistent(cfg)
    after, _ = _snapshot(cfg)
    purged = [u for u, n in after.items() if n == 0]
    assert len(purged) == 1 and purged[0] in (uids["done_old"], uids["none_old"])
    assert {e["series_instance_uid"] for e in _audit_purged(cfg)} == set(purged)
    # and with retention back on, the rest goes and everything stays consistent
    data["retention"] = {"received_max_age_days": 30}
    write_toml(data, cfg_path)
    r = subprocess.run([srnode_executable(), "purge", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    after, _ = _snapshot(cfg)
    assert after[uids["done_old"]] == 0 and after[uids["none_old"]] == 0
    assert after[uids["queued_old"]] == 2
    _assert_consistent(cfg)


def test_max_storage_gb_keeps_the_node_accepting(tmp_path: Path) -> None:
    """Series keep arriving past the budget: the oldest go, every C-STORE succeeds."""
    one = make_ct_series(tmp_path / "probe", n_slices=3)
    series_bytes = sum(p.stat().st_size for p in one)
    budget = 3.5 * series_bytes
    cfg = node_config(tmp_path, retention={"max_storage_gb": budget / 1024**3,
                                           "check_interval_seconds": 0.5},
                      series={"quiet_period_seconds": 0.5, "check_interval_seconds": 0.2})
    sent: list[str] = []
    with running_node(cfg) as node:
        for i in range(8):
            files = make_ct_series(tmp_path / f"s{i}", n_slices=3)
            rc, out = storescu("127.0.0.1", node.scp.port, files, called_ae_title="SRNODE",
                               extra_args=["-v"])
            assert rc == 0 and out.count("Received Store Response (Success)") == 3, out
            sent.append(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            time.sleep(0.6)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows, _ = _snapshot(cfg)
            if sum(rows.values()) * series_bytes / 3 <= budget:
                break
            time.sleep(0.5)
        rows, _ = _snapshot(cfg)
        stored = [u for u in sent if rows.get(u)]
        assert 0 < len(stored) <= 3
        assert stored == sent[-len(stored):]  # the newest stay, the oldest went first
        # still accepting after the purges
        files = make_ct_series(tmp_path / "after", n_slices=3)
        rc, out = storescu("127.0.0.1", node.scp.port, files, called_ae_title="SRNODE",
                           extra_args=["-v"])
        assert rc == 0 and out.count("Received Store Response (Success)") == 3, out
    _assert_consistent(cfg)
    reasons = {e["reason"] for e in _audit_purged(cfg)}
    assert reasons == {"storage_budget"}


def test_a_series_that_changed_since_planning_is_kept(tmp_path: Path) -> None:
    """A job queued (or an instance received) between planning and purging keeps the series."""
    from storage.retention import Retention, RetentionPolicy

    cfg, uids, _ = _populate(tmp_path)
    db = Database(cfg.node.database_url)
    store = FileStore(Path(cfg.node.storage_dir))
    retention = Retention(db, store, Path(cfg.node.storage_dir) / "derived")
    policy = RetentionPolicy(received_max_age_s=30 * 86400)
    stale = retention.plan(policy, utcnow())
    assert {i.series_instance_uid for i in stale.items} == {uids["done_old"], uids["none_old"]}
    with db.session() as s:  # a new job for one, a new instance time for the other
        s.execute(update(Job).where(Job.series_instance_uid == uids["done_old"])
                  .values(state="queued"))
        s.execute(update(Series).where(Series.series_instance_uid == uids["none_old"])
                  .values(last_received_at=utcnow()))
    retention.plan = lambda *a, **k: stale  # type: ignore[method-assign]
    report = retention.purge(policy, utcnow())
    db.dispose()
    assert report.items == []
    after, _ = _snapshot(cfg)
    assert after[uids["done_old"]] == 2 and after[uids["none_old"]] == 2
    _assert_consistent(cfg)
