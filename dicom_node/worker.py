"""The worker: claim a job, run it in a child process, keep its lease alive, record the outcome.

Each job runs in a fresh child process (``spawn``) so that a hung or runaway enhancement can be
stopped at the processing timeout without taking the node down, and a crash of the child
leaves the job to be retried.  The child derives the series slab by slab (bounded memory for
any series length) into ``<storage_dir>/derived/job-<id>/`` and writes ``manifest.json`` last:
only a manifest publishes the series.  A retried job that finds a manifest re-sends the same
instances (same UIDs) instead of deriving a second series, and each destination receives only
the instances it has not acknowledged yet; one that finds a folder without a manifest (an
attempt killed mid-series) empties it and derives the series afresh.  Instances are sent from
the written files, one at a time.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.index import open_index
from dicom_node.metrics import observe_finished_job
from storage.db import Database
from storage.filestore import FileStore
from storage.job_types import BackoffPolicy, ClaimedJob, JobState
from storage.jobs import JobQueue

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.pipeline import JobOutcome

LOGGER = logging.getLogger(__name__)

#: States a job child records itself when it finishes; a heartbeat refused in one of these is
#: not a lost lease but a child that is about to exit.
FINISHED_BY_CHILD = frozenset({JobState.DONE, JobState.FAILED, JobState.HELD, JobState.QUEUED})
MANIFEST = "manifest.json"


class PermanentJobError(Exception):
    """A job error that retrying cannot fix.

    An inconsistent series, a result that cannot be made a compliant derived series, or a
    model, task or weights file the engine does not have.
    """


def _engine_choice(summary: JobOutcome) -> dict[str, Any]:
    """The degradation estimate, its confidence and the engine's choice, for the audit log."""
    estimate = summary.get("degradation") or {}
    return {"degradation": estimate.get("family"), "confidence": estimate.get("confidence"),
            "in_family": estimate.get("in_family"), "choice": summary.get("choice"),
            "model": summary.get("model"), "fallback_reason": summary.get("fallback_reason")}


def job_queue(config: Config, db: Database) -> JobQueue:
    """The job queue with the backoff policy of ``[worker]``."""
    w = config.worker
    return JobQueue(db, BackoffPolicy(w.backoff_base_seconds, w.backoff_max_seconds))


def job_output_dir(config: Config, job_id: int) -> Path:
    """Folder that holds the derived series of one job."""
    return Path(config.node.storage_dir) / "derived" / f"job-{job_id}"


def _derive_or_reuse(
    config: Config, job: ClaimedJob, queue: JobQueue, worker_id: str, db: Database,
    seconds: dict[str, float],
) -> tuple[list[Path], JobOutcome]:
    """Derive the series (or reuse what an earlier attempt wrote) and return files + summary.

    The series is derived slab by slab straight into the job folder; the manifest, written
    last, publishes it.  A folder without a manifest is what an interrupted attempt left
    (a crash, kill -9 or timeout mid-series): it is emptied and the series derived afresh.
    """
    import shutil

    from dicom_node.derive.elements import DerivationError
    from dicom_node.derive.series import SeriesError
    from dicom_node.pipeline import derive_series_to
    from sr_engine.errors import UnknownModelError, UnsupportedRequestError, WeightsNotFoundError
    from storage.ingest import mark_produced_series

    out_dir = job_output_dir(config, job.id)
    manifest = out_dir / MANIFEST
    if manifest.exists():
        data = json.loads(manifest.read_text())
        LOGGER.info("job %d: reusing derived series %s from an earlier attempt", job.id,
                    data["summary"]["derived_series_instance_uid"])
        return [out_dir / name for name in data["files"]], data["summary"]
    if out_dir.exists():
        LOGGER.info("job %d: removing the unpublished output of an interrupted attempt", job.id)
        shutil.rmtree(out_dir)

    params = job.params

    def on_stage(stage: str, secs: dict[str, float]) -> None:
        queue.set_stage(job.id, worker_id, stage, {**seconds, **secs})

    def before_write(derived_uid: str) -> None:
        # the node must never enhance its own output, should it come back
        mark_produced_series(db, derived_uid)

    if not job.instance_paths:
        raise PermanentJobError("the series has no stored instances")
    try:
        w = derive_series_to(
            job.instance_paths, config, out_dir, mode=params.mode, scale=params.scale,
            model=params.model, output_spacing=params.output_spacing, on_stage=on_stage,
            before_write=before_write,
        )
    except (SeriesError, DerivationError, UnknownModelError, UnsupportedRequestError,
            WeightsNotFoundError) as exc:
        # the same input, model and weights fail the same way on every attempt: no backoff loop
        shutil.rmtree(out_dir, ignore_errors=True)
        raise PermanentJobError(f"{type(exc).__name__}: {exc}") from exc
    seconds.update(w.seconds)
    summary = w.summary()
    if w.gate in ("hold", "skip"):
        shutil.rmtree(out_dir, ignore_errors=True)
        summary["held" if w.gate == "hold" else "skipped"] = True
        return [], summary
    t0 = time.perf_counter()
    FileStore(out_dir).write_atomic(
        manifest, json.dumps({"files": [p.name for p in w.paths], "summary": summary}).encode()
    )
    seconds["writing"] = seconds.get("writing", 0.0) + time.perf_counter() - t0
    return w.paths, summary


def run_job(config: Config, job: ClaimedJob, worker_id: str) -> None:
    """Process one claimed job to its end state (done, queued for retry, failed or held).

    Runs in the child process.  Every outcome is written to the job store.
    """
    from dicom_node.derive.transcode import transcode_files
    from dicom_node.heap import fix_mmap_threshold
    from dicom_node.logs import configure_logging
    from dicom_node.network.scu import (
        DestinationUnavailableError,
        SendError,
        configure_pynetdicom,
        send_instances,
    )

    fix_mmap_threshold()  # freed slab arrays go back to the OS
    configure_logging(config.node.log_level, config.node.log_file or None)
    configure_pynetdicom()
    db = open_index(config, migrate=False)  # the parent process migrated it
    queue = job_queue(config, db)
    audit = AuditLog(config.node.audit_log or None)
    seconds: dict[str, float] = {}
    try:
        try:
            paths, summary = _derive_or_reuse(config, job, queue, worker_id, db, seconds)
        except PermanentJobError as exc:
            queue.fail(job.id, worker_id, str(exc), retryable=False)
            audit.record("job_failed", job_id=job.id, series_instance_uid=job.series_instance_uid,
                         reason=str(exc))
            LOGGER.warning("job %d failed permanently: %s", job.id, exc)
            return
        if summary.get("held"):
            reason = f"held by the safety gate: {summary['gate_reason']}"
            queue.hold(job.id, worker_id, reason, {**summary, "stage_seconds": seconds})
            audit.record("job_held", job_id=job.id, series_instance_uid=job.series_instance_uid,
                         reason=reason, **_engine_choice(summary))
            LOGGER.warning("job %d held: %s", job.id, reason)
            return
        if summary.get("skipped"):  # [safety] on_fallback = "skip": done, nothing to send
            queue.complete(job.id, worker_id,
                           {**summary, "destinations": {}, "stage_seconds": seconds})
            audit.record("job_done", job_id=job.id, series_instance_uid=job.series_instance_uid,
                         derived_series_instance_uid=None, sent=False,
                         reason=summary["gate_reason"], **_engine_choice(summary))
            LOGGER.info("job %d done without a derived series: %s", job.id,
                        summary["gate_reason"])
            return
        queue.set_stage(job.id, worker_id, "sending", seconds)
        t0 = time.perf_counter()
        failures: dict[str, str] = {}
        delivered: dict[str, int] = {}
        for name in job.params.destinations:
            dest = config.destination(name)
            done = queue.sent_instances(job.id, name)

            def on_stored(uid: str, name: str = name) -> None:
                queue.record_sent(job.id, name, uid)

            try:
                dest_paths = transcode_files(
                    paths, dest.transfer_syntax,
                    job_output_dir(config, job.id) / f"ts-{dest.transfer_syntax}",
                )
                report = send_instances(
                    dest, dest_paths, calling_ae_title=config.node.ae_title,
                    skip_sop_instance_uids=done, on_stored=on_stored,
                )
            except (DestinationUnavailableError, SendError) as exc:
                failures[name] = str(exc)
                audit.record("send_failed", job_id=job.id, destination=name, reason=str(exc))
                continue
            delivered[name] = len(report.sent) + len(report.skipped)
            if report.failed:
                failures[name] = (f"{len(report.failed)} instance(s) refused, e.g. status "
                                  f"0x{next(iter(report.failed.values())):04X}")
            audit.record(
                "series_sent", job_id=job.id, destination=name, ae_title=dest.ae_title,
                host=dest.host, port=dest.port,
                derived_series_instance_uid=summary["derived_series_instance_uid"],
                sent=len(report.sent), skipped=len(report.skipped), failed=len(report.failed),
            )
        seconds["sending"] = time.perf_counter() - t0
        result = {**summary, "destinations": delivered, "stage_seconds": seconds}
        if failures:
            error = "; ".join(f"{k}: {v}" for k, v in failures.items())
            state = queue.fail(job.id, worker_id, f"send failed: {error}", retryable=True)
            LOGGER.warning("job %d: send failed (%s), now %s", job.id, error, state)
            return
        queue.complete(job.id, worker_id, result)
        audit.record("job_done", job_id=job.id, series_instance_uid=job.series_instance_uid,
                     derived_series_instance_uid=summary["derived_series_instance_uid"],
                     **_engine_choice(summary))
        LOGGER.info("job %d done: %s", job.id, summary["derived_series_instance_uid"])
    except Exception as exc:  # noqa: BLE001 - record any failure on the job, then retry
        LOGGER.exception("job %d failed", job.id)
        queue.fail(job.id, worker_id, f"{type(exc).__name__}: {exc}", retryable=True)
    finally:
        db.dispose()


class Worker:
    """Claims jobs from the shared queue and runs each in a child process.

    Parameters
    ----------
    config
        Node configuration (``[worker]`` and ``[engine]`` are used).
    db, store, audit
        Shared services of the node.
    worker_id
        Identity recorded on claimed jobs (default: host name, pid and a random suffix).
    """

    def __init__(self, config: Config, db: Database, store: FileStore, audit: AuditLog,
                 worker_id: str | None = None) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.audit = audit
        self.queue = job_queue(config, db)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._ctx = multiprocessing.get_context("spawn")

    def run_once(self) -> int | None:
        """Claim and process one job; return its id, or ``None`` if the queue had nothing."""
        w = self.config.worker
        job = self.queue.claim(self.worker_id, w.lease_seconds)
        if job is None:
            return None
        LOGGER.info("job %d claimed (attempt %d/%d, rule %s)", job.id, job.attempts,
                    job.max_attempts, job.rule)
        self._execute(job)
        observe_finished_job(self.queue.get(job.id), list(job.params.destinations))
        return job.id

    def _execute(self, job: ClaimedJob) -> None:
        w = self.config.worker
        proc = self._ctx.Process(target=run_job, args=(self.config, job, self.worker_id),
                                 name=f"srnode-job-{job.id}", daemon=True)
        proc.start()
        deadline = time.monotonic() + w.job_timeout_seconds
        while True:
            proc.join(timeout=max(0.2, min(w.heartbeat_seconds, w.lease_seconds / 3)))
            if not proc.is_alive():
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.join()
                msg = f"processing timeout after {w.job_timeout_seconds:.0f} s"
                state = self.queue.fail(job.id, self.worker_id, msg, retryable=True)
                LOGGER.warning("job %d: %s, now %s", job.id, msg, state)
                return
            if not self.queue.heartbeat(job.id, self.worker_id, w.lease_seconds):
                now = self.queue.get(job.id)
                state = now.get("state")
                if state in FINISHED_BY_CHILD:
                    proc.join(timeout=5)  # the child recorded its outcome and is exiting
                    if not proc.is_alive():
                        return
                proc.kill()
                proc.join()
                if state == JobState.CANCELLED:
                    LOGGER.info("job %d: cancelled while running, its process stopped", job.id)
                else:
                    LOGGER.warning("job %d: lease lost (now %s, worker %s), stopping", job.id,
                                   state, now.get("worker_id") or "-")
                return
        info = self.queue.get(job.id)
        mine = info.get("worker_id", self.worker_id) == self.worker_id
        if info["state"] == JobState.RUNNING and mine:
            msg = f"worker process exited with code {proc.exitcode} before finishing"
            self.queue.fail(job.id, self.worker_id, msg, retryable=True)
            LOGGER.warning("job %d: %s", job.id, msg)

    def run_forever(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set."""
        while not stop.is_set():
            try:
                job_id = self.run_once()
            except Exception:  # noqa: BLE001 - keep the loop alive (e.g. database briefly down)
                LOGGER.exception("worker loop error")
                job_id = None
            if job_id is None:
                stop.wait(self.config.worker.poll_interval_seconds)
