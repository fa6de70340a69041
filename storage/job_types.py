"""The job queue's vocabulary: states, parameters, the backoff policy and a claimed job.

Plain data (no DICOM, no torch): rules produce :class:`JobParams`, the queue stores them as
JSON, and a worker gets them back typed in a :class:`ClaimedJob`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class JobState(StrEnum):
    """Where a job is (stored as its string value)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    HELD = "held"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"


#: States a job leaves for ``superseded`` when its series received new instances.
SUPERSEDABLE_STATES: frozenset[JobState] = frozenset(
    {JobState.QUEUED, JobState.HELD, JobState.FAILED}
)
#: States an operator can send back to the queue (``srnode retry``).
RETRYABLE_STATES: frozenset[JobState] = frozenset({JobState.FAILED, JobState.HELD})
#: States an operator can cancel (``POST /api/jobs/{id}/cancel``); a running job's worker
#: loses its lease at the next heartbeat and stops its child process.
CANCELLABLE_STATES: frozenset[JobState] = frozenset(
    {JobState.QUEUED, JobState.HELD, JobState.RUNNING}
)


@dataclass(frozen=True)
class JobParams:
    """What a job asks the worker to do (from the rule that selected the series).

    Attributes
    ----------
    mode, scale, model
        The engine task.
    output_spacing
        Volume mode: output slice spacing in mm (``None``: input spacing / scale).
    destinations
        Names of the destinations that receive the derived series.
    """

    mode: str = "slice"
    scale: int = 2
    model: str = "auto"
    output_spacing: float | None = None
    destinations: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON document stored on the job row."""
        return {
            "mode": self.mode,
            "scale": self.scale,
            "model": self.model,
            "output_spacing": self.output_spacing,
            "destinations": list(self.destinations),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> JobParams:
        """Read the stored document (lenient: missing keys take their defaults)."""
        data = data or {}
        spacing = data.get("output_spacing")
        return cls(
            mode=str(data.get("mode", "slice")),
            scale=int(data.get("scale", 2)),
            model=str(data.get("model", "auto")),
            output_spacing=None if spacing is None else float(spacing),
            destinations=tuple(str(d) for d in data.get("destinations", ()) or ()),
        )


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before the next attempt of a failed job: ``min(max, base * 2**(attempts-1))``.

    Attributes
    ----------
    base_seconds, max_seconds
        Backoff base and cap in seconds (``[worker] backoff_base_seconds``,
        ``backoff_max_seconds``).
    """

    base_seconds: float = 30.0
    max_seconds: float = 1800.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` attempts (>= 1)."""
        return float(min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1)))


@dataclass
class ClaimedJob:
    """A job a worker now holds the lease on."""

    id: int
    series_instance_uid: str
    rule: str
    params: JobParams
    attempts: int
    max_attempts: int
    instance_paths: list[Path] = field(default_factory=list)
