"""The job queue: durable, leased, retried with exponential backoff, dead-lettered.

A job is claimed in ONE transaction that two workers can never both win: on PostgreSQL the
candidate row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite every
transaction holds the database write lock (``BEGIN IMMEDIATE``) and the claim is a conditional
``UPDATE ... WHERE state = <seen state> AND attempts = <seen attempts>`` whose row count says
who won. A running job whose lease expired (dead worker) is taken over by the next claim; if
it already used all its attempts it is dead-lettered (state ``failed``) instead.

Every transition by a worker (``heartbeat``, ``set_stage``, ``complete``, ``fail``, ``hold``)
checks that the job is still running under that worker id; a worker that lost its lease gets
``False`` from ``heartbeat`` and :class:`InvalidJobStateError` from the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.errors import InvalidJobStateError, JobNotFoundError
from storage.job_rows import create_job, job_dict, transition
from storage.job_types import (
    CANCELLABLE_STATES,
    RETRYABLE_STATES,
    BackoffPolicy,
    ClaimedJob,
    JobParams,
    JobState,
)
from storage.models import Instance, Job, SentInstance, Series, utcnow

LOGGER = logging.getLogger(__name__)


def series_instance_paths(session: Session, series_fk: int) -> list[str]:
    """The stored files of a series, sorted by instance number (then SOP Instance UID)."""
    return list(session.scalars(
        select(Instance.path)
        .where(Instance.series_fk == series_fk)
        .order_by(
            Instance.instance_number.is_(None),
            Instance.instance_number,
            Instance.sop_instance_uid,
        )
    ).all())


def _check_states(states: Sequence[str] | None) -> None:
    """Raise ``ValueError`` naming any unknown job state."""
    if states is not None:
        unknown = set(states) - set(JobState)
        if unknown:
            raise ValueError(f"unknown job state(s): {sorted(unknown)}")


class JobQueue:
    """The job queue stored in the database.

    Parameters
    ----------
    db
        The database (upgraded).
    backoff
        How long a failed job waits before its next attempt (the queue owns the policy).
    """

    def __init__(self, db: Database, backoff: BackoffPolicy | None = None) -> None:
        self.db = db
        self.backoff = backoff or BackoffPolicy()

    # -- creation ---------------------------------------------------------------------------
    def enqueue(
        self,
        series_instance_uid: str,
        rule: str,
        params: JobParams,
        max_attempts: int = 3,
    ) -> int:
        """Queue a job for an indexed series.

        Parameters
        ----------
        series_instance_uid
            The series to enhance (must be indexed).
        rule
            Name of the rule that selected it.
        params
            Processing parameters.
        max_attempts
            Attempts before the job is dead-lettered.

        Returns
        -------
        int
            The new job id.

        Raises
        ------
        JobNotFoundError
            If the series is not indexed.
        """
        with self.db.session() as session:
            series = session.scalars(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).first()
            if series is None:
                raise JobNotFoundError(f"series {series_instance_uid} is not indexed")
            return create_job(session, series, rule, params, max_attempts, utcnow())

    # -- claiming ---------------------------------------------------------------------------
    def claim(self, worker_id: str, lease_seconds: float) -> ClaimedJob | None:
        """Take the oldest runnable job, or return None when there is none.

        Runnable: ``queued`` with ``not_before <= now``, or ``running`` with an expired lease.

        Parameters
        ----------
        worker_id
            Identifies the claiming worker.
        lease_seconds
            How long the lease lasts without a heartbeat.

        Returns
        -------
        ClaimedJob or None
            The claimed job with its instances' paths sorted by instance number.
        """
        for _ in range(16):
            now = utcnow()
            with self.db.session() as session:
                self._dead_letter_expired(session, now)
                runnable = or_(
                    and_(Job.state == JobState.QUEUED, Job.not_before <= now),
                    and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
                )
                query = select(Job.id, Job.state, Job.attempts).where(runnable)
                query = query.order_by(Job.created_at, Job.id).limit(1)
                if self.db.is_postgresql:
                    query = query.with_for_update(skip_locked=True)
                row = session.execute(query).first()
                if row is None:
                    return None
                job_id, seen_state, seen_attempts = row
                won = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.state == seen_state,
                        Job.attempts == seen_attempts,
                    )
                    .values(
                        state=JobState.RUNNING,
                        attempts=Job.attempts + 1,
                        worker_id=worker_id,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        started_at=now,
                        finished_at=None,
                        updated_at=now,
                        stage="claimed",
                        stage_seconds={},
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount
                if won != 1:
                    continue
                if seen_state == JobState.RUNNING:
                    LOGGER.warning("job %d: lease expired, taken over by %s", job_id, worker_id)
                job = session.get(Job, job_id, populate_existing=True)
                assert job is not None
                paths = series_instance_paths(session, job.series_fk)
                return ClaimedJob(
                    id=job.id,
                    series_instance_uid=job.series_instance_uid,
                    rule=job.rule,
                    params=JobParams.from_json(job.params),
                    attempts=job.attempts,
                    max_attempts=job.max_attempts,
                    instance_paths=[Path(p) for p in paths],
                )
        return None

    @staticmethod
    def _dead_letter_expired(session: Session, now: datetime) -> None:
        """Fail running jobs whose lease expired after their last allowed attempt."""
        expired = session.scalars(
            select(Job)
            .where(
                Job.state == JobState.RUNNING,
                Job.lease_expires_at < now,
                Job.attempts >= Job.max_attempts,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for job in expired:
            LOGGER.warning("job %d: lease expired on its last attempt, dead-lettered", job.id)
            transition(job, JobState.FAILED, now, error="lease expired (worker lost)")
            job.finished_at = now

    # -- worker transitions -------------------------------------------------------------------
    def _own(self, session: Session, job_id: int, worker_id: str) -> Job:
        """Return the job locked for update if it is running under ``worker_id``."""
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state != JobState.RUNNING or job.worker_id != worker_id:
            raise InvalidJobStateError(
                f"job {job_id} is {job.state} under worker {job.worker_id!r}, "
                f"not running under {worker_id!r}"
            )
        return job

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease; return False if the job is no longer ours."""
        now = utcnow()
        with self.db.session() as session:
            count = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
        return count == 1

    def set_stage(
        self,
        job_id: int,
        worker_id: str,
        stage: str,
        seconds: dict[str, float] | None = None,
    ) -> None:
        """Record the stage the worker is in and (merged) per-stage timings in seconds.

        Raises
        ------
        JobNotFoundError, InvalidJobStateError
            If the job does not exist or is not running under ``worker_id``.
        """
        with self.db.session() as session:
            job = self._own(session, job_id, worker_id)
            job.stage = stage
            if seconds:
                merged = dict(job.stage_seconds or {})
                merged.update({k: float(v) for k, v in seconds.items()})
                job.stage_seconds = merged
            job.updated_at = utcnow()

    def complete(self, job_id: int, worker_id: str, result: dict[str, Any]) -> None:
        """Mark the job done with its result.

        Raises
        ------
        JobNotFoundError, InvalidJobStateError
            If the job does not exist or is not running under ``worker_id``.
        """
        now = utcnow()
        with self.db.session() as session:
            job = self._own(session, job_id, worker_id)
            transition(job, JobState.DONE, now, error=None)
            job.result = result
            if isinstance(result.get("stage_seconds"), dict):
                job.stage_seconds = result["stage_seconds"]
            job.stage = "done"
            job.finished_at = now
            job.lease_expires_at = None

    def fail(
        self,
        job_id: int,
        worker_id: str,
        error: str,
        retryable: bool = True,
    ) -> JobState:
        """Record a failed attempt; requeue with backoff or dead-letter.

        Parameters
        ----------
        job_id, worker_id
            The job and the worker holding it.
        error
            What went wrong (no PHI).
        retryable
            False dead-letters at once (an error that cannot succeed on retry).

        Returns
        -------
        JobState
            The new state: ``queued`` (after the queue's backoff delay) or ``failed``.

        Raises
        ------
        JobNotFoundError, InvalidJobStateError
            If the job does not exist or is not running under ``worker_id``.
        """
        now = utcnow()
        with self.db.session() as session:
            job = self._own(session, job_id, worker_id)
            job.lease_expires_at = None
            if retryable and job.attempts < job.max_attempts:
                transition(job, JobState.QUEUED, now, error=error)
                job.not_before = now + timedelta(seconds=self.backoff.delay(job.attempts))
                job.worker_id = None
                return JobState.QUEUED
            transition(job, JobState.FAILED, now, error=error)
            job.finished_at = now
            return JobState.FAILED

    def hold(
        self, job_id: int, worker_id: str, reason: str, result: dict[str, Any] | None = None
    ) -> None:
        """Hold the job for a human (e.g. the consistency gate refused the output).

        Raises
        ------
        JobNotFoundError, InvalidJobStateError
            If the job does not exist or is not running under ``worker_id``.
        """
        now = utcnow()
        with self.db.session() as session:
            job = self._own(session, job_id, worker_id)
            transition(job, JobState.HELD, now, error=reason)
            if result is not None:
                job.result = result
            job.finished_at = now
            job.lease_expires_at = None

    # -- operator actions ---------------------------------------------------------------------
    def retry(self, job_id: int) -> None:
        """Requeue a failed or held job now, with its attempts reset to 0.

        The previous error stays in the job's ``history``; ``error`` is cleared.

        Raises
        ------
        JobNotFoundError
            If there is no such job.
        InvalidJobStateError
            If the job is not failed or held.
        """
        now = utcnow()
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            if job.state not in RETRYABLE_STATES:
                raise InvalidJobStateError(
                    f"job {job_id} is {job.state}; only failed or held jobs can be retried"
                )
            transition(job, JobState.QUEUED, now, error=None, note="manual retry")
            job.attempts = 0
            job.not_before = now
            job.worker_id = None
            job.lease_expires_at = None
            job.finished_at = None

    def cancel(self, job_id: int, note: str = "cancelled by the operator") -> str:
        """Cancel a queued, held or running job (state ``cancelled``, final).

        A running job's lease is taken away: its worker's next heartbeat fails and the worker
        stops the job's child process; the child's own later transitions are refused.

        Parameters
        ----------
        job_id
            The job.
        note
            Kept in the job's history.

        Returns
        -------
        str
            The state the job was in.

        Raises
        ------
        JobNotFoundError
            If there is no such job.
        InvalidJobStateError
            If the job is not queued, held or running.
        """
        now = utcnow()
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            if job.state not in CANCELLABLE_STATES:
                raise InvalidJobStateError(
                    f"job {job_id} is {job.state}; only queued, held or running jobs can be "
                    "cancelled"
                )
            previous = str(job.state)
            transition(job, JobState.CANCELLED, now, error=job.error, note=note)
            job.stage = "cancelled"
            job.worker_id = None
            job.lease_expires_at = None
            job.finished_at = now
            return previous

    # -- reading ------------------------------------------------------------------------------
    def get(self, job_id: int) -> dict[str, Any]:
        """Return one job as a dict (see :meth:`list_jobs`).

        Raises
        ------
        JobNotFoundError
            If there is no such job.
        """
        with self.db.read_session() as session:
            row = session.execute(
                select(Job, Series)
                .outerjoin(Series, Series.id == Job.series_fk)
                .where(Job.id == job_id)
            ).first()
            if row is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            return job_dict(row[0], row[1])

    def list_jobs(
        self, states: Sequence[str] | None = None, limit: int = 500, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Return the newest jobs first, optionally only those in ``states``.

        Each dict holds id, series_instance_uid, modality, series_description, state, attempts,
        error, rule, stage, stage_seconds, created_at, updated_at (ISO strings), result and more.
        ``offset`` skips that many of the newest (paging).
        """
        _check_states(states)
        with self.db.read_session() as session:
            query = select(Job, Series).outerjoin(Series, Series.id == Job.series_fk)
            if states is not None:
                query = query.where(Job.state.in_(list(states)))
            query = query.order_by(Job.id.desc()).offset(offset).limit(limit)
            return [job_dict(job, series) for job, series in session.execute(query).all()]

    def count(self, states: Sequence[str] | None = None) -> int:
        """Return the number of jobs, optionally only those in ``states``."""
        from sqlalchemy import func

        _check_states(states)
        with self.db.read_session() as session:
            query = select(func.count()).select_from(Job)
            if states is not None:
                query = query.where(Job.state.in_(list(states)))
            return int(session.execute(query).scalar_one())

    def counts(self) -> dict[str, int]:
        """Return the number of jobs in each state."""
        from sqlalchemy import func

        with self.db.read_session() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = {str(state): 0 for state in JobState}
        counts.update({state: int(n) for state, n in rows})
        return counts

    # -- partial sends --------------------------------------------------------------------------
    def record_sent(self, job_id: int, destination: str, sop_instance_uid: str) -> None:
        """Remember that a derived instance reached a destination (idempotent)."""
        with self.db.session() as session:
            exists = session.scalars(
                select(SentInstance.id).where(
                    SentInstance.job_id == job_id,
                    SentInstance.destination == destination,
                    SentInstance.sop_instance_uid == sop_instance_uid,
                )
            ).first()
            if exists is None:
                if session.get(Job, job_id) is None:
                    raise JobNotFoundError(f"job {job_id} does not exist")
                session.add(
                    SentInstance(
                        job_id=job_id, destination=destination, sop_instance_uid=sop_instance_uid
                    )
                )

    def sent_instances(self, job_id: int, destination: str) -> set[str]:
        """Return the SOP Instance UIDs of a job already delivered to a destination."""
        with self.db.session() as session:
            return set(
                session.scalars(
                    select(SentInstance.sop_instance_uid).where(
                        SentInstance.job_id == job_id, SentInstance.destination == destination
                    )
                ).all()
            )

    def delivery(self, job_id: int) -> dict[str, dict[str, Any]]:
        """Per destination: how many derived instances it acknowledged, and when the last one.

        Returns
        -------
        dict
            ``{destination: {"sent": n, "last_sent_at": ISO string}}`` for every destination
            that acknowledged at least one instance of the job.
        """
        from sqlalchemy import func

        with self.db.read_session() as session:
            rows = session.execute(
                select(SentInstance.destination, func.count(), func.max(SentInstance.sent_at))
                .where(SentInstance.job_id == job_id)
                .group_by(SentInstance.destination)
            ).all()
        return {name: {"sent": int(n), "last_sent_at": last.isoformat() if last else None}
                for name, n, last in rows}
