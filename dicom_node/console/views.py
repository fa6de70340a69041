"""What the console and the REST API show: jobs in detail, received series, rule tests, audit.

Each function reads the index (or the audit log) once and returns JSON-serialisable data; the
API returns it as is and the pages render it.  Patient names and IDs are added only when the
caller says the request passed the token check (``show_patient``).
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node.config import Config
from dicom_node.log_safety import is_valid_uid
from storage.db import Database
from storage.errors import JobNotFoundError
from storage.job_types import CANCELLABLE_STATES, RETRYABLE_STATES, JobState
from storage.jobs import JobQueue, series_instance_paths
from storage.models import Instance, Job, Patient, ProducedSeries, Series, Study

#: Bytes read from the end of the audit log for the audit page (older entries are not shown).
AUDIT_TAIL_BYTES = 4 * 1024 * 1024


class SeriesNotFoundError(LookupError):
    """No received series has this Series Instance UID."""


def check_uid(value: str, what: str = "series") -> str:
    """Return ``value`` if it is a well-formed DICOM UID.

    Raises
    ------
    ValueError
        Empty, longer than 64 characters, or not dot-separated numbers without leading zeros.
    """
    if not is_valid_uid(value):
        raise ValueError(f"{what} {value[:80]!r} is not a DICOM UID (digits and dots, at most "
                         "64 characters, no leading zeros)")
    return value


def job_actions(state: str) -> dict[str, bool]:
    """Which operator actions a job in ``state`` allows."""
    return {"retry": state in RETRYABLE_STATES, "cancel": state in CANCELLABLE_STATES}


def stage_bars(stage_seconds: dict[str, float]) -> list[dict[str, Any]]:
    """Each stage with its seconds and its share of the job's total time (for the bars)."""
    total = sum(float(v) for v in stage_seconds.values())
    return [{"name": k, "seconds": float(v), "fraction": float(v) / total if total > 0 else 0.0}
            for k, v in stage_seconds.items()]


def _delivery_state(sent: int, expected: int | None) -> str:
    """``delivered``, ``partial`` or ``not sent``."""
    if expected and sent >= expected:
        return "delivered"
    return "partial" if sent else "not sent"


def job_detail(config: Config, queue: JobQueue, job_id: int) -> dict[str, Any]:
    """One job with its stages, safety figures, destinations and errors (``GET /api/jobs/{id}``).

    Parameters
    ----------
    config
        The node configuration (destination addresses).
    queue
        The job queue.
    job_id
        The job.

    Raises
    ------
    JobNotFoundError
        If there is no such job.
    """
    job = queue.get(job_id)
    result = job.get("result") or {}
    delivered = queue.delivery(job_id)
    expected = result.get("instances")
    known = {d.name: d for d in config.destinations}
    send_errors = _send_errors(job.get("error") or "")
    destinations = []
    for name in job["params"].get("destinations", []):
        dest = known.get(name)
        sent = delivered.get(name, {}).get("sent", 0)
        destinations.append({
            "name": name,
            "ae_title": dest.ae_title if dest else None,
            "host": dest.host if dest else None,
            "port": dest.port if dest else None,
            "sent": sent,
            "expected": expected,
            "last_sent_at": delivered.get(name, {}).get("last_sent_at"),
            "state": _delivery_state(sent, expected),
            "error": send_errors.get(name),
        })
    stages = stage_bars(job["stage_seconds"])
    # each error once, when it happened (a later transition may carry the same error along)
    errors: list[dict[str, Any]] = []
    for h in job["history"]:
        if h.get("error") and (not errors or errors[-1]["error"] != h["error"]):
            errors.append({"at": h.get("at"), "error": h["error"]})
    if job.get("error") and (not errors or errors[-1]["error"] != job["error"]):
        errors.append({"at": job.get("updated_at"), "error": job["error"]})
    return {
        **job,
        "stages": stages,
        "safety": {
            "gate": result.get("gate"),
            "reason": result.get("gate_reason"),
            "consistency": result.get("consistency"),
            "choice": result.get("choice"),
            "fallback_reason": result.get("fallback_reason"),
            "degradation": result.get("degradation"),
            "model": result.get("model"),
            "engine": result.get("engine"),
        },
        "destinations": destinations,
        "errors": errors,
        "actions": job_actions(job["state"]),
    }


def _send_errors(error: str) -> dict[str, str]:
    """Split the worker's ``send failed: a: why; b: why`` error into one entry per destination."""
    prefix = "send failed: "
    if not error.startswith(prefix):
        return {}
    out: dict[str, str] = {}
    for part in error[len(prefix):].split("; "):
        name, _, why = part.partition(": ")
        if why:
            out[name] = why
    return out


def job_source_paths(db: Database, job_id: int) -> list[Path]:
    """The stored files of the series a job enhances (sorted by instance number).

    Raises
    ------
    JobNotFoundError
        If there is no such job.
    """
    with db.read_session() as session:
        series_fk = session.scalar(select(Job.series_fk).where(Job.id == job_id))
        if series_fk is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        return [Path(p) for p in series_instance_paths(session, series_fk)]


def _series_row(series: Series, study: Study, patient: Patient, n_files: int,
                jobs: list[dict[str, Any]], show_patient: bool) -> dict[str, Any]:
    """One received series as the API and the series page show it."""
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "modality": series.modality,
        "body_part_examined": series.body_part_examined,
        "series_description": series.series_description,
        "series_number": series.series_number,
        "instances": series.num_instances,
        "stored_files": n_files,
        "calling_ae_title": series.calling_ae_title,
        "first_received_at": series.first_received_at.isoformat(),
        "last_received_at": series.last_received_at.isoformat(),
        "is_derived": series.is_derived,
        "produced_by_node": series.produced_by_node,
        "enhanceable": series.enhanceable,
        "skip_reason": series.skip_reason,
        "jobs": jobs,
        "patient": ({"name": patient.patient_name, "id": patient.patient_id}
                    if show_patient else None),
    }


def list_series(db: Database, limit: int = 50, offset: int = 0, skipped: bool | None = None,
                show_patient: bool = False) -> dict[str, Any]:
    """Received series, newest first, with counts, skip reasons and their jobs.

    Parameters
    ----------
    db
        The index.
    limit, offset
        Paging.
    skipped
        ``True``: only series with a skip reason; ``False``: only those without.
    show_patient
        Add patient name and ID (only for a request that passed the token check).
    """
    with db.read_session() as s:
        where = []
        if skipped is True:
            where.append(Series.skip_reason.isnot(None))
        elif skipped is False:
            where.append(Series.skip_reason.is_(None))
        total = int(s.scalar(select(func.count()).select_from(Series).where(*where)) or 0)
        rows = s.execute(
            select(Series, Study, Patient)
            .join(Study, Study.id == Series.study_fk)
            .join(Patient, Patient.id == Study.patient_fk)
            .where(*where)
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .offset(offset).limit(limit)
        ).all()
        ids = [r[0].id for r in rows]
        files = dict(s.execute(select(Instance.series_fk, func.count())
                               .where(Instance.series_fk.in_(ids))
                               .group_by(Instance.series_fk)).all()) if ids else {}
        jobs: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            for jid, fk, state, rule in s.execute(
                    select(Job.id, Job.series_fk, Job.state, Job.rule)
                    .where(Job.series_fk.in_(ids)).order_by(Job.id.desc())).all():
                jobs[fk].append({"id": jid, "state": state, "rule": rule,
                                 "url": f"/api/jobs/{jid}"})
        series = [_series_row(se, st, pa, int(files.get(se.id, 0)), jobs[se.id], show_patient)
                  for se, st, pa in rows]
    return {"series": series, "total": total, "limit": limit, "offset": offset}


def rule_test(config: Config, db: Database, series_instance_uid: str) -> dict[str, Any]:
    """Which rule selects a received series, and why each other rule does not.

    Follows the completeness check (:mod:`storage.completeness`): derived series need a rule
    with ``include_derived``, series srnode produced and series that cannot be enhanced are
    never selected, and every matching rule gets its own job.

    Raises
    ------
    ValueError
        If the UID is malformed.
    SeriesNotFoundError
        If no such series was received.
    """
    check_uid(series_instance_uid)
    with db.read_session() as s:
        series = s.scalars(select(Series).where(
            Series.series_instance_uid == series_instance_uid)).first()
        if series is None:
            raise SeriesNotFoundError(f"series {series_instance_uid} was not received")
        produced = series.produced_by_node or s.get(ProducedSeries, series_instance_uid) is not None
        jobs = s.execute(select(Job.id, Job.state, Job.rule).where(Job.series_fk == series.id)
                         .order_by(Job.id.desc())).all()
        facts = {"modality": series.modality, "body_part_examined": series.body_part_examined,
                 "series_description": series.series_description,
                 "instances": series.num_instances, "is_derived": series.is_derived,
                 "produced_by_node": produced, "enhanceable": series.enhanceable,
                 "skip_reason": series.skip_reason}
    blockers: list[str] = []
    if produced:
        blockers.append("srnode produced this series itself (never enhanced again)")
    if not facts["enhanceable"]:
        blockers.append(f"not enhanceable: {facts['skip_reason'] or 'unknown reason'}")
    rules = []
    for rule in config.rules:
        why = rule.mismatches(series.modality, series.body_part_examined,
                              series.series_description, series.num_instances)
        if series.is_derived and not rule.include_derived:
            why.insert(0, "the series is DERIVED and the rule has no include_derived")
        rules.append({"name": rule.name, "matches": not why and not blockers,
                      "reasons": blockers + why if (why or blockers) else
                      ["every condition of the rule holds"],
                      "mode": rule.mode, "scale": rule.scale, "model": rule.model,
                      "destinations": list(rule.destinations)})
    matching = [r["name"] for r in rules if r["matches"]]
    return {
        "series_instance_uid": series_instance_uid,
        "series": facts,
        "matching_rules": matching,
        "rule": matching[0] if matching else None,
        "explanation": (f"rule {matching[0]} selects this series" if len(matching) == 1 else
                        f"rules {', '.join(matching)} select this series (one job each)"
                        if matching else "no rule selects this series"),
        "rules": rules,
        "jobs": [{"id": i, "state": st, "rule": r, "url": f"/api/jobs/{i}"} for i, st, r in jobs],
    }


def audit_entries(path: str | Path | None, event: str = "", text: str = "",
                  job_id: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The newest audit entries first, filtered by event name, job and free text.

    Parameters
    ----------
    path
        The audit log (``[node] audit_log``; ``None`` or "" = none kept).
    event
        Only entries of this event (exact).
    text
        Only entries whose JSON contains this text (case-insensitive), e.g. a UID or AE title.
    job_id
        Only entries about this job.
    limit
        At most this many entries.
    """
    if not path or not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - AUDIT_TAIL_BYTES))
        data = fh.read()
    lines = data.split(b"\n")
    if size > AUDIT_TAIL_BYTES:
        lines = lines[1:]  # the first one may be cut
    found: deque[dict[str, Any]] = deque(maxlen=limit)
    needle = text.lower()
    for line in lines:
        if not line.strip():
            continue
        if needle and needle not in line.decode("utf-8", "replace").lower():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if event and entry.get("event") != event:
            continue
        if job_id is not None and entry.get("job_id") != job_id:
            continue
        found.append(entry)
    return list(reversed(found))


def dashboard(queue: JobQueue, recent: int = 15) -> dict[str, Any]:
    """The queue by state and the most recent jobs (with their stage bars)."""
    jobs = queue.list_jobs(limit=recent)
    for job in jobs:
        job["stages"] = stage_bars(job["stage_seconds"])
    return {"counts": queue.counts(), "recent": jobs, "states": [str(s) for s in JobState]}


def series_patient(db: Database, series_instance_uid: str) -> dict[str, str] | None:
    """Patient name and ID of a received series (only for a request that passed the token check).

    Never logged; the caller decides whether the request may see them.
    """
    with db.read_session() as s:
        row = s.execute(
            select(Patient.patient_name, Patient.patient_id)
            .join(Study, Study.patient_fk == Patient.id)
            .join(Series, Series.study_fk == Study.id)
            .where(Series.series_instance_uid == series_instance_uid)
        ).first()
    return {"name": row[0], "id": row[1]} if row is not None else None
