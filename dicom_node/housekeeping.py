"""Housekeeping on the scheduler: retention purges and the free-disk warning.

``[retention]`` limits become a :class:`storage.retention.RetentionPolicy`; every purged item is
written to the audit log as ``series_purged`` (UIDs, sizes and the reason, never patient data).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.index import open_index
from dicom_node.worker import job_output_dir
from storage.db import Database
from storage.filestore import FileStore
from storage.models import utcnow
from storage.retention import (
    INTENT_DIR,
    PurgeItem,
    PurgeReport,
    Retention,
    RetentionPolicy,
)

LOGGER = logging.getLogger(__name__)
_DAY = 86400.0
_GB = 1024**3
_MB = 1024**2


def retention_policy(config: Config) -> RetentionPolicy:
    """The ``[retention]`` section as a storage-level policy."""
    r = config.retention
    return RetentionPolicy(
        received_max_age_s=r.received_max_age_days * _DAY,
        derived_max_age_s=r.derived_max_age_days * _DAY,
        delete_received_after_done=r.delete_received_after_done,
        max_storage_bytes=int(r.max_storage_gb * _GB),
    )


def settle_seconds(config: Config) -> float:
    """How long a series must be quiet before retention may look at it.

    Twice the longest quiet period (default or any rule's) plus three completeness-check
    intervals: by then the completeness check has queued every job the series will get.
    """
    quiet = [config.series.quiet_period_seconds] + [
        r.quiet_period_seconds for r in config.rules if r.quiet_period_seconds is not None]
    return 2 * max(quiet) + 3 * config.series.check_interval_seconds


def run_purge(config: Config, db: Database, store: FileStore, audit: AuditLog,
              dry_run: bool = False) -> PurgeReport:
    """Purge (or list, with ``dry_run``) what ``[retention]`` selects.

    Returns
    -------
    PurgeReport
        The items removed (or that would be).
    """
    retention = Retention(db, store, job_output_dir(config, 0).parent)

    def on_purged(item: PurgeItem) -> None:
        audit.record("series_purged", **{k: v for k, v in item.describe().items()
                                         if k not in ("folder", "series_id")})
        metrics.SERIES_PURGED.labels(kind=item.kind).inc()

    return retention.purge(
        retention_policy(config), utcnow() - timedelta(seconds=settle_seconds(config)),
        dry_run=dry_run, on_purged=on_purged,
    )


def purge_now(config: Config, dry_run: bool = False) -> PurgeReport:
    """``srnode purge``: open the index and the store of ``config`` and run :func:`run_purge`."""
    db = open_index(config, migrate=True)
    try:
        return run_purge(config, db, FileStore(Path(config.node.storage_dir)),
                         AuditLog(config.node.audit_log or None), dry_run=dry_run)
    finally:
        db.dispose()


def format_purge(report: PurgeReport) -> str:
    """One line per purged (or, dry run, purgeable) item and a total."""
    verb = "would purge" if report.dry_run else "purged"
    lines = []
    for i in report.items:
        what = (f"job {i.job_id} derived output" if i.kind == "derived"
                else f"{i.instances} instance(s)")
        lines.append(f"{verb} {i.kind:<8} {i.series_instance_uid}  {what}, {i.bytes} bytes, "
                     f"since {i.since[:19]} ({i.reason})")
    lines.append(f"{verb} {len(report.items)} item(s), {report.purged_bytes} of "
                 f"{report.stored_bytes} stored bytes")
    return "\n".join(lines)


def warn_free_disk(config: Config, store: FileStore) -> None:
    """Log a warning when free disk is below ``[node] warn_free_disk_mb``."""
    node = config.node
    try:
        free_mb = store.free_bytes() // _MB
    except OSError as exc:
        LOGGER.error("cannot stat storage: %s", exc)
        return
    if free_mb < node.min_free_disk_mb:
        LOGGER.error("free disk %d MB is below min_free_disk_mb %d: C-STORE answers 0xA700",
                     free_mb, node.min_free_disk_mb)
    elif node.warn_free_disk_mb and free_mb < node.warn_free_disk_mb:
        LOGGER.warning("free disk %d MB is below warn_free_disk_mb %d (C-STORE is refused "
                       "below %d MB): free space or set [retention]", free_mb,
                       node.warn_free_disk_mb, node.min_free_disk_mb)


class Housekeeping:
    """Runs retention every ``[retention] check_interval_seconds`` and checks free disk.

    Parameters
    ----------
    config, db, store, audit
        The node's services.
    disk_interval_seconds
        Seconds between free-disk checks.
    """

    def __init__(self, config: Config, db: Database, store: FileStore, audit: AuditLog,
                 disk_interval_seconds: float = 60.0) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.audit = audit
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self._purge, "interval",
                                seconds=config.retention.check_interval_seconds,
                                id="retention", max_instances=1, coalesce=True,
                                next_run_time=utcnow() + timedelta(seconds=1))
        self._scheduler.add_job(lambda: warn_free_disk(config, store), "interval",
                                seconds=disk_interval_seconds, id="free-disk", max_instances=1,
                                coalesce=True, next_run_time=utcnow())

    def _purge(self) -> None:
        policy_off = retention_policy(self.config) == RetentionPolicy()
        if policy_off and not (self.store.root / INTENT_DIR).is_dir():
            return  # nothing to do and nothing interrupted: leave the index alone
        try:
            run_purge(self.config, self.db, self.store, self.audit)
        except Exception as exc:  # noqa: BLE001 - logged, retried at the next interval
            LOGGER.error("retention failed: %s: %s", type(exc).__name__, exc)

    def start(self) -> None:
        """Start the schedule."""
        self._scheduler.start()

    def shutdown(self) -> None:
        """Stop the schedule (waiting for a running purge)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
