"""Node status: is it receiving, queueing and delivering (what an administrator checks first)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node.config import Config
from dicom_node.health import Health
from dicom_node.index import connect_index, index_created, open_index, redact_url
from storage.db import Database
from storage.errors import StorageError
from storage.filestore import FileStore
from storage.job_types import RETRYABLE_STATES, JobState
from storage.jobs import JobQueue
from storage.models import Instance, Series


def skipped_series(db: Database, limit: int = 10) -> list[dict[str, Any]]:
    """The most recently received series that are not enhanced, with the recorded reason.

    UIDs, modality, counts and the reason only, never patient identifiers.
    """
    with db.read_session() as s:
        rows = s.scalars(
            select(Series)
            .where(Series.skip_reason.isnot(None))
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .limit(limit)
        ).all()
        return [
            {"series_instance_uid": r.series_instance_uid, "modality": r.modality,
             "instances": r.num_instances, "reason": r.skip_reason}
            for r in rows
        ]


def format_skipped(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per skipped series (for ``srnode status`` and ``srnode jobs``)."""
    return [
        f"skipped     series {r['series_instance_uid']} ({r['modality'] or '-'}, "
        f"{r['instances']} instances): {r['reason']}"
        for r in skipped
    ]


def node_status(config: Config, db: Database | None = None) -> dict[str, Any]:
    """Counts of series, instances and jobs, last reception, disk space and recent failures.

    Contains UIDs and counts only, never patient identifiers.

    Parameters
    ----------
    config
        The node configuration.
    db
        The node's open index (``GET /api/status``); ``None`` opens it read-only and closes
        it again (``srnode status``).
    """
    own = db is None
    if db is None:
        db = open_index(config, migrate=False)
    n_series = n_instances = 0
    last = None
    failed: list[dict[str, Any]] = []
    jobs = {str(state): 0 for state in JobState}
    skipped: list[dict[str, Any]] = []
    try:
        if index_created(db):
            queue = JobQueue(db)
            with db.read_session() as s:
                n_series = int(s.execute(select(func.count()).select_from(Series)).scalar_one())
                n_instances = int(
                    s.execute(select(func.count()).select_from(Instance)).scalar_one())
                last = s.execute(select(func.max(Series.last_received_at))).scalar_one()
            failed = queue.list_jobs(states=sorted(RETRYABLE_STATES), limit=10)
            jobs = queue.counts()
            skipped = skipped_series(db)
    finally:
        if own:
            db.dispose()
    storage = Path(config.node.storage_dir)
    disk = shutil.disk_usage(storage if storage.exists() else storage.parent)
    return {
        "ae_title": config.node.ae_title,
        "port": config.node.port,
        "database": redact_url(config.node.database_url),
        "storage_dir": str(storage),
        "free_disk_mb": disk.free // (1024 * 1024),
        "min_free_disk_mb": config.node.min_free_disk_mb,
        "warn_free_disk_mb": config.node.warn_free_disk_mb,
        "series": n_series,
        "instances": n_instances,
        "last_received_at": last.astimezone(UTC).isoformat() if last else None,
        "jobs": jobs,
        "rules": [r.name for r in config.rules],
        "destinations": [f"{d.name}={d.ae_title}@{d.host}:{d.port}" for d in config.destinations],
        "recent_failures": [
            {"id": j["id"], "state": j["state"], "series_instance_uid": j["series_instance_uid"],
             "error": j["error"]} for j in failed
        ],
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "skipped_series": skipped,
    }


def format_status(status: dict[str, Any]) -> str:
    """Human-readable summary of :func:`node_status` (or :func:`node_report`)."""
    if "error" in status:
        health = status.get("health", {})
        return "\n".join([f"index       {status['error']}",
                          f"health      {health.get('status', 'unknown')}"]
                         + [f"  {n}: {'ok' if c['ok'] else 'FAILING'} - {c['detail']}"
                            for n, c in health.get("checks", {}).items()])
    jobs = ", ".join(f"{k} {v}" for k, v in status["jobs"].items() if v) or "none"
    lines = [
        f"node        {status['ae_title']} port {status['port']}",
        f"database    {status['database']}",
        f"storage     {status['storage_dir']} ({status['free_disk_mb']} MB free, "
        f"floor {status['min_free_disk_mb']} MB)",
        f"received    {status['series']} series, {status['instances']} instances, "
        f"last {status['last_received_at'] or 'never'}",
        f"jobs        {jobs}",
        f"rules       {', '.join(status['rules']) or 'none (series are indexed, not queued)'}",
        f"destinations {', '.join(status['destinations']) or 'none'}",
    ]
    if "health" in status:
        health = status["health"]
        lines.append(f"health      {health['status']}")
        lines.extend(f"  {name}: {'ok' if c['ok'] else 'FAILING'} - {c['detail']}"
                     for name, c in health["checks"].items())
    if status["free_disk_mb"] < status["min_free_disk_mb"]:
        lines.append("WARNING     free disk below the floor: C-STORE answers 0xA700")
    elif status["free_disk_mb"] < status.get("warn_free_disk_mb", 0):
        lines.append("WARNING     free disk below warn_free_disk_mb: C-STORE is refused at the "
                     "floor")
    for f in status["recent_failures"]:
        lines.append(f"{f['state']:<11} job {f['id']}: {f['error']}")
    lines.extend(format_skipped(status.get("skipped_series", [])))
    return "\n".join(lines)


def node_health(config: Config) -> Health:
    """The checks of ``GET /healthz`` from another process (the SCP is checked by C-ECHO)."""
    from dicom_node.health import EngineDevice, check_health, echo_check

    db = connect_index(config)
    try:
        return check_health(config, db, FileStore(Path(config.node.storage_dir)),
                            echo_check(config), EngineDevice(config.engine.device))
    finally:
        db.dispose()


def node_report(config: Config, db: Database | None = None,
                health: Callable[[], Health] | None = None) -> dict[str, Any]:
    """:func:`node_status` plus the health checks (``"health"``); ``srnode status``.

    If the index cannot be read, the counts are left out and ``"error"`` says why.

    Parameters
    ----------
    config
        The node configuration.
    db, health
        The running node's index and health checks (``GET /api/status``); by default the
        index is opened read-only and the checks run from this process (:func:`node_health`).
    """
    try:
        report = node_status(config, db)
    except StorageError as exc:
        report = {"error": str(exc)}
    report["health"] = (health() if health is not None else node_health(config)).as_dict()
    return report
