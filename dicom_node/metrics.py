"""Prometheus metrics of a node (served at ``GET /metrics`` by :mod:`dicom_node.http_server`).

Two kinds:

- **Process-local** counters and the stage histogram live in this module and start at zero
  with the process (Prometheus' ``rate()`` handles the reset): instances received, instances
  refused per status, associations rejected per reason, job stage times, send failures per
  destination, purged items and finished jobs by the engine's choice (SR or interpolation).
  They count what *this* process saw (its SCP, its worker).
- **Index-derived** metrics are read from the job store at every scrape
  (:class:`IndexCollector`), so they survive restarts and include every worker sharing the
  queue: jobs per state, series delivered per destination; plus free disk and the engine
  device.  Retention keeps job rows, so ``srnode_series_sent_total`` never goes backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from sr_engine.tasks import is_interpolation
from storage.db import Database
from storage.errors import StorageError
from storage.filestore import FileStore
from storage.job_types import JobState
from storage.jobs import JobQueue
from storage.models import Job, SentInstance

LOGGER = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: dashboards use the counters themselves

INSTANCES_RECEIVED = Counter(
    "srnode_instances_received", "Instances stored and indexed by this process's SCP.",
    registry=None,
)
INSTANCES_REFUSED = Counter(
    "srnode_instances_refused", "C-STORE requests answered with a failure status, by status.",
    ["status"], registry=None,
)
ASSOCIATIONS_REJECTED = Counter(
    "srnode_associations_rejected", "Association requests rejected, by reason.", ["reason"],
    registry=None,
)
JOB_STAGE_SECONDS = Histogram(
    "srnode_job_stage_seconds", "Seconds per processing stage of jobs this process ran.",
    ["stage"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=None,
)
SEND_FAILURES = Counter(
    "srnode_send_failures", "Failed deliveries of a derived series (one per attempt), by "
    "destination.", ["destination"], registry=None,
)
SERIES_PURGED = Counter(
    "srnode_series_purged", "Received series and derived outputs removed by retention.",
    ["kind"], registry=None,
)
JOBS_DONE = Counter(
    "srnode_jobs_done", "Jobs this process's worker finished, by the engine's choice (model: "
    "super-resolution; interpolation: bicubic, a Lanczos-3 blend, or an interpolation model; "
    "also the jobs [safety] on_fallback = skip finished without a series) and model.",
    ["choice", "model"], registry=None,
)
PROCESS_METRICS = (INSTANCES_RECEIVED, INSTANCES_REFUSED, ASSOCIATIONS_REJECTED,
                   JOB_STAGE_SECONDS, SEND_FAILURES, SERIES_PURGED, JOBS_DONE)


#: Short label values for the reasons the SCP gives when rejecting an association.
_REJECT_REASONS = (("called ae", "called_ae_title"), ("calling ae", "calling_ae_title"),
                   ("too many", "local_limit"), ("protocol", "protocol_version"),
                   ("application context", "application_context"))


def reject_reason_label(reason: str) -> str:
    """Map a rejection reason (free text) to a short, bounded label value."""
    low = reason.lower()
    for needle, label in _REJECT_REASONS:
        if needle in low:
            return label
    return "other"


def observe_finished_job(info: Mapping[str, Any], destinations: Sequence[str]) -> None:
    """Record stage times, send failures and the choice of a job this worker just ran.

    Parameters
    ----------
    info
        The job as :meth:`storage.jobs.JobQueue.get` returns it after the attempt.
    destinations
        The destination names of the job's rule.
    """
    if info.get("state") == JobState.RUNNING:
        return  # another worker took it over: its worker records it
    for stage, seconds in (info.get("stage_seconds") or {}).items():
        JOB_STAGE_SECONDS.labels(stage=stage).observe(float(seconds))
    result = info.get("result") or {}
    if info.get("state") == JobState.DONE and result:
        model = str(result.get("model") or "unknown")
        interpolated = is_interpolation(model, "fallback" if result.get("choice") ==
                                        "interpolation" else None)
        JOBS_DONE.labels(choice="interpolation" if interpolated else "model", model=model).inc()
    error = info.get("error") or ""
    prefix = "send failed: "
    if info.get("state") in (JobState.QUEUED, JobState.FAILED) and error.startswith(prefix):
        detail = error[len(prefix):]
        for name in destinations:
            if detail.startswith(f"{name}: ") or f"; {name}: " in detail:
                SEND_FAILURES.labels(destination=name).inc()


class IndexCollector(Collector):
    """Metrics read from the index at scrape time (see the module docstring).

    Parameters
    ----------
    db, store
        The node's job store and file store.
    engine_device
        Returns ``(requested, resolved)`` device names, e.g. ``("auto", "cpu")``.
    """

    def __init__(self, db: Database, store: FileStore,
                 engine_device: Callable[[], tuple[str, str]]) -> None:
        self.db = db
        self.store = store
        self.engine_device = engine_device

    def collect(self) -> Iterator[Metric]:
        """Yield the index-derived metrics (the index ones are left out if it is down)."""
        up = GaugeMetricFamily("srnode_index_up", "1 when the index answered this scrape.")
        try:
            counts = JobQueue(self.db).counts()
            with self.db.session() as s:
                sent = s.execute(
                    select(SentInstance.destination, func.count(func.distinct(SentInstance.job_id)))
                    .join(Job, Job.id == SentInstance.job_id)
                    .where(Job.state == JobState.DONE)
                    .group_by(SentInstance.destination)
                ).all()
        except StorageError as exc:
            LOGGER.warning("metrics: index unavailable: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            jobs = GaugeMetricFamily("srnode_jobs", "Jobs in the queue, by state.",
                                     labels=["state"])
            for state, n in counts.items():
                jobs.add_metric([state], n)
            yield jobs
            series = CounterMetricFamily(
                "srnode_series_sent",
                "Derived series delivered, by destination (from the index: done jobs).",
                labels=["destination"])
            for dest, n in sent:
                series.add_metric([dest], int(n))
            yield series
        yield up
        try:
            free = GaugeMetricFamily("srnode_free_disk_bytes",
                                     "Free bytes on the storage file system.")
            free.add_metric([], self.store.free_bytes())
            yield free
        except OSError as exc:
            LOGGER.warning("metrics: cannot stat storage: %s", exc)
        requested, resolved = self.engine_device()
        info = InfoMetricFamily("srnode_engine_device", "The SR engine's device.")
        info.add_metric([], {"requested": requested, "device": resolved})
        yield info


def build_registry(collector: IndexCollector) -> CollectorRegistry:
    """A registry with the process-local metrics and ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    for metric in PROCESS_METRICS:
        registry.register(metric)
    registry.register(collector)
    return registry
