"""Job rows: create, change state (with history), supersede, describe (inside a session).

The queue (:mod:`storage.jobs`) and the completeness check (:mod:`storage.completeness`)
change job rows only through these functions, so every transition lands in the job's history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from storage.errors import InvalidJobStateError
from storage.job_types import SUPERSEDABLE_STATES, JobParams, JobState
from storage.models import Job, Series


def _iso(value: datetime | None) -> str | None:
    """Return an ISO 8601 string (or None)."""
    return value.isoformat() if value is not None else None


def job_dict(job: Job, series: Series | None) -> dict[str, Any]:
    """Describe a job as a JSON-serialisable dict (no PHI)."""
    return {
        "id": job.id,
        "series_instance_uid": job.series_instance_uid,
        "modality": series.modality if series is not None else "",
        "series_description": series.series_description if series is not None else "",
        "body_part_examined": series.body_part_examined if series is not None else "",
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "error": job.error,
        "history": list(job.history or []),
        "rule": job.rule,
        "params": dict(job.params or {}),
        "stage": job.stage,
        "stage_seconds": dict(job.stage_seconds or {}),
        "worker_id": job.worker_id,
        "instance_count": job.instance_count,
        "not_before": _iso(job.not_before),
        "lease_expires_at": _iso(job.lease_expires_at),
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "result": job.result,
    }


def transition(
    job: Job, state: JobState, now: datetime, error: str | None, note: str | None = None
) -> None:
    """Move a job to ``state``, appending the transition to its history."""
    entry: dict[str, Any] = {"at": now.isoformat(), "from": str(job.state), "to": str(state)}
    if error:
        entry["error"] = error
    elif job.error and state == JobState.QUEUED:
        entry["previous_error"] = job.error
    if note:
        entry["note"] = note
    job.history = [*(job.history or []), entry]
    job.state = str(state)
    job.error = error
    job.updated_at = now


def supersede(job: Job, now: datetime, note: str) -> None:
    """Mark a queued, held or failed job ``superseded`` inside an open session.

    Parameters
    ----------
    job
        The job row (locked by the caller).
    now
        Transition time.
    note
        Why (kept in the job's history).

    Raises
    ------
    InvalidJobStateError
        If the job is running or already finished.
    """
    if job.state not in SUPERSEDABLE_STATES:
        raise InvalidJobStateError(f"job {job.id} is {job.state}; it cannot be superseded")
    transition(job, JobState.SUPERSEDED, now, error=job.error, note=note)
    job.finished_at = job.finished_at or now


def create_job(
    session: Session,
    series: Series,
    rule: str,
    params: JobParams,
    max_attempts: int,
    now: datetime,
) -> int:
    """Insert a queued job for ``series`` inside an open session and return its id."""
    job = Job(
        series_fk=series.id,
        series_instance_uid=series.series_instance_uid,
        rule=rule,
        params=params.to_json(),
        state=JobState.QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        not_before=now,
        stage="queued",
        stage_seconds={},
        history=[],
        instance_count=series.num_instances,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job.id
