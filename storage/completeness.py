r"""Completeness check: turn quiet (or too old) series into jobs.

A series is complete for a rule when no instance arrived for the rule's quiet period
(``rule.quiet_period_seconds`` or the default); a series that keeps growing is forced complete
``max_age`` seconds after its first instance. There is one job per (series, matching rule).

New instances after a job was created (instance count differs from the job's
``instance_count``, or ``series.last_received_at > job.created_at``):

* once the series is quiet again, a fresh job is created and the previous job is marked
  ``superseded`` if it is queued, held or failed; a ``done`` job stays ``done`` (its output
  was already sent);
* if the previous job is ``running``, nothing happens yet: the check waits until it finishes
  and then creates the fresh job (so one series is never processed twice at the same time);
* a series only forced by ``max_age`` (still growing) never gets a second job until it is
  quiet.

A series still being received on an open association of this node (``receiving``) is never
quiet, however long its sender pauses between instances: the quiet period counts from the last
instance of a released association (``max_age`` still forces it).  Associations received by
other nodes sharing the index are not seen; their series rely on the quiet period alone.

Series that this node produced (ImageType token or a recorded UID) are never queued, so a PACS
routing our output back cannot start a loop.  Secondary derived series (``DERIVED\SECONDARY``,
reformats, MIPs: :attr:`storage.records.InstanceHeader.is_derived`) are skipped too, unless a
rule sets ``include_derived``; ``DERIVED\PRIMARY`` reconstructions are acquisitions and are
queued.  Series of SOP classes srnode does not enhance (dose reports, secondary captures) are
never queued.  Every skipped series gets its reason in ``series.skip_reason`` (shown by
``srnode status`` and ``srnode jobs``); the reason is cleared when a job is created.

Candidate series rows are locked (``FOR UPDATE`` on PostgreSQL; SQLite transactions hold the
write lock) and ingest resets ``completeness_checked_at``, so an instance committed during a
check is never lost: it either is counted by the job or makes the series a candidate again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import exists, false, or_, select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.job_rows import create_job, supersede
from storage.job_types import SUPERSEDABLE_STATES, JobState
from storage.models import Job, ProducedSeries, Series, utcnow
from storage.records import SKIP_REASON_LENGTH
from storage.rules import Rule

LOGGER = logging.getLogger(__name__)

#: Reasons recorded on series that are never queued.
SKIP_PRODUCED = "srnode's own output (never enhanced again)"
SKIP_DERIVED = (
    "secondary derived series (DERIVED\\SECONDARY, reformat or MIP); no rule sets include_derived"
)
SKIP_NOT_ENHANCEABLE = "SOP class is not a CT/MR image: stored, never enhanced"


def _record_skips(session: Session, any_derived: bool, now: datetime) -> None:
    """Record why never-queued series are skipped, once per series, and mark them checked.

    Never queued: srnode's own output, secondary derived series (unless a rule includes them)
    and SOP classes srnode does not enhance.
    """
    produced = exists().where(ProducedSeries.series_instance_uid == Series.series_instance_uid)
    unexplained = session.scalars(
        select(Series).where(
            Series.skip_reason.is_(None),
            or_(
                Series.produced_by_node.is_(True),
                produced,
                Series.enhanceable.is_(False),
                Series.is_derived.is_(True) if not any_derived else false(),
            ),
        )
    ).all()
    for series in unexplained:
        if series.produced_by_node or session.get(ProducedSeries, series.series_instance_uid):
            reason = SKIP_PRODUCED
        elif not series.enhanceable:
            reason = SKIP_NOT_ENHANCEABLE
        else:
            reason = SKIP_DERIVED
        _skip(series, reason, now)


def _skip(series: Series, reason: str, now: datetime) -> None:
    """Record the reason a series is not enhanced (logged once, with its UID only)."""
    if series.skip_reason != reason:
        LOGGER.info("series %s not queued: %s", series.series_instance_uid, reason)
    series.skip_reason = reason[:SKIP_REASON_LENGTH]
    series.completeness_checked_at = now


def check_completeness(
    db: Database,
    rules: Sequence[Rule],
    default_quiet_period: float,
    max_age: float,
    max_attempts: int = 3,
    now: datetime | None = None,
    receiving: Collection[str] = (),
) -> list[int]:
    """Create jobs for series that became complete.

    Parameters
    ----------
    db
        The database.
    rules
        Rules in configuration order; each matching rule gets its own job.
    default_quiet_period
        Seconds without a new instance before a series is complete (rules may override).
    max_age
        Seconds after the first instance after which a growing series is forced complete.
    max_attempts
        ``max_attempts`` of the new jobs.
    now
        Current time (aware UTC); the real time when omitted.
    receiving
        Series Instance UIDs with instances received on associations that are still open:
        not quiet yet.

    Returns
    -------
    list[int]
        Ids of the jobs created.
    """
    now = now or utcnow()
    if not rules:
        return []
    quiet_by_rule = {
        r.name: (
            r.quiet_period_seconds if r.quiet_period_seconds is not None else default_quiet_period
        )
        for r in rules
    }
    shortest_quiet = min(quiet_by_rule.values())
    any_derived = any(r.include_derived for r in rules)
    created: list[int] = []
    with db.session() as session:
        _record_skips(session, any_derived, now)
        produced = exists().where(ProducedSeries.series_instance_uid == Series.series_instance_uid)
        not_checked = or_(
            Series.completeness_checked_at.is_(None),
            Series.completeness_checked_at < Series.last_received_at,
        )
        candidates = session.scalars(
            select(Series)
            .where(
                Series.is_derived.is_(False) if not any_derived else Series.is_derived.isnot(None),
                Series.produced_by_node.is_(False),
                Series.enhanceable.isnot(False),
                ~produced,
                or_(
                    Series.last_received_at <= now - timedelta(seconds=shortest_quiet),
                    Series.first_received_at <= now - timedelta(seconds=max_age),
                ),
                not_checked,
            )
            .order_by(Series.first_received_at, Series.id)
            .with_for_update()
        ).all()
        for series in candidates:
            created.extend(
                _check_series(session, series, rules, quiet_by_rule, max_age, max_attempts, now,
                              series.series_instance_uid in receiving)
            )
    if created:
        LOGGER.info("completeness check queued %d job(s): %s", len(created), created)
    return created


def _check_series(
    session: Session,
    series: Series,
    rules: Sequence[Rule],
    quiet_by_rule: dict[str, float],
    max_age: float,
    max_attempts: int,
    now: datetime,
    sender_connected: bool = False,
) -> list[int]:
    """Create the jobs one series needs now; mark it checked when nothing is pending."""
    created: list[int] = []
    pending = False
    matched = False
    # an open association may still deliver instances: not quiet, however long the pause
    quiet_for = 0.0 if sender_connected else (now - series.last_received_at).total_seconds()
    forced = (now - series.first_received_at).total_seconds() >= max_age
    for rule in rules:
        if series.is_derived and not rule.include_derived:
            continue
        if not rule.matches(
            series.modality,
            series.body_part_examined,
            series.series_description,
            series.num_instances,
        ):
            continue
        matched = True
        quiet = quiet_for >= quiet_by_rule[rule.name]
        latest = session.scalars(
            select(Job)
            .where(Job.series_fk == series.id, Job.rule == rule.name)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(1)
            .with_for_update()
        ).first()
        if latest is not None and not _has_new_instances(series, latest):
            continue  # this rule's job already covers every instance
        if latest is None:
            if not (quiet or forced):
                pending = True
                continue
        else:
            if not quiet:
                pending = True  # still growing: wait for quiet before a fresh job
                continue
            if latest.state == JobState.RUNNING:
                pending = True  # decided: wait for the running job to finish
                continue
            if latest.state in SUPERSEDABLE_STATES:
                supersede(latest, now, "new instances arrived")
        job_id = create_job(session, series, rule.name, rule.job_params(), max_attempts, now)
        LOGGER.info(
            "series %s complete (%d instances%s): job %d for rule %s",
            series.series_instance_uid,
            series.num_instances,
            ", forced by max age" if forced and not quiet else "",
            job_id,
            rule.name,
        )
        created.append(job_id)
    if created:
        series.skip_reason = None
    if not pending and not created:
        # Nothing matched (or every match is covered): skip this series until it changes.
        series.completeness_checked_at = now
        if not matched and (quiet_for >= min(quiet_by_rule.values()) or forced):
            _skip(series, _no_rule_reason(series), now)
    return created


def _no_rule_reason(series: Series) -> str:
    """Reason recorded when no rule selects a complete series."""
    if series.is_derived:
        return SKIP_DERIVED.split(";")[0] + "; no rule with include_derived matches it"
    return (
        f"no rule matches (modality {series.modality or '-'}, "
        f"{series.num_instances} instance{'s' if series.num_instances != 1 else ''})"
    )


def _has_new_instances(series: Series, job: Job) -> bool:
    """Return whether ``series`` changed since ``job`` was created.

    Compares the instance count recorded on the job (exact: the check holds the series row
    lock when it creates a job) and the last reception time.
    """
    return series.num_instances != job.instance_count or series.last_received_at > job.created_at


class CompletenessScheduler:
    """Runs :func:`check_completeness` every ``interval_seconds`` in a background thread.

    Parameters
    ----------
    db, rules, default_quiet_period, max_age, max_attempts
        Passed to :func:`check_completeness`.
    interval_seconds
        Seconds between checks.
    receiving
        Returns the Series Instance UIDs still being received on open associations
        (:meth:`dicom_node.network.scp.StorageSCP.receiving_series`); ``None``: none known.
    """

    def __init__(
        self,
        db: Database,
        rules: Sequence[Rule],
        default_quiet_period: float,
        max_age: float,
        interval_seconds: float,
        max_attempts: int = 3,
        receiving: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.db = db
        self.receiving = receiving
        self.rules = tuple(rules)
        self.default_quiet_period = default_quiet_period
        self.max_age = max_age
        self.interval_seconds = interval_seconds
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._scheduled,
            "interval",
            seconds=interval_seconds,
            id="completeness",
            max_instances=1,
            coalesce=True,
        )

    def run_once(self) -> list[int]:
        """Run one check now and return the ids of the jobs created."""
        with self._lock:
            return check_completeness(
                self.db,
                self.rules,
                self.default_quiet_period,
                self.max_age,
                self.max_attempts,
                receiving=self.receiving() if self.receiving is not None else (),
            )

    def _scheduled(self) -> None:
        """Scheduler entry point: never lets an exception kill the schedule."""
        try:
            self.run_once()
        except Exception as exc:  # noqa: BLE001 - logged, retried at the next interval
            LOGGER.error("completeness check failed: %s: %s", type(exc).__name__, exc)

    @property
    def running(self) -> bool:
        """Whether the background scheduler is started."""
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Start checking in the background."""
        if not self._scheduler.running:
            self._scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the background checks (waiting for a running one when ``wait``)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
