"""Rules: which complete series are enhanced, and how.

A rule is plain data (no DICOM, no torch), so the completeness check in ``storage`` can match
series rows against it and the worker can read the processing parameters from the job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.job_types import JobParams


@dataclass(frozen=True)
class Rule:
    """One ``[[rules]]`` entry.

    Attributes
    ----------
    name
        Unique rule name, stored on each job.
    modalities
        Modalities to match (e.g. ``["CT", "MR"]``); empty matches any.
    body_parts
        BodyPartExamined values to match (case-insensitive); empty matches any.
    series_description
        Regular expression searched in SeriesDescription (case-insensitive); empty matches any.
    min_instances
        Fewest instances a series needs (a volume needs several slices).
    mode, scale, model
        What the engine does (checked against the engine's tasks when the config is loaded,
        :func:`dicom_node.config.parse_config`).
    output_spacing
        Volume mode: output slice spacing in mm (``None``: input spacing / scale).
    quiet_period_seconds
        Seconds without a new instance before the series counts complete (``None``: the
        ``[series]`` default).
    destinations
        Names of ``[[destinations]]`` that receive the derived series.
    include_derived
        Also select series whose ImageType is DERIVED (e.g. MPR reformats). Series srnode
        produced itself are never selected, whatever this says.
    """

    name: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    series_description: str = ""
    min_instances: int = 1
    mode: str = "slice"
    scale: int = 2
    model: str = "auto"
    output_spacing: float | None = None
    quiet_period_seconds: float | None = None
    destinations: tuple[str, ...] = field(default_factory=tuple)
    include_derived: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a rule needs a name")
        if self.min_instances < 1:
            raise ValueError(f"rule {self.name}: min_instances must be >= 1")
        if self.quiet_period_seconds is not None and self.quiet_period_seconds <= 0:
            raise ValueError(f"rule {self.name}: quiet_period_seconds must be > 0")
        try:
            re.compile(self.series_description)
        except re.error as exc:
            raise ValueError(f"rule {self.name}: bad series_description pattern: {exc}") from exc

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Rule:
        """Build a rule from a TOML table, raising ValueError on unknown keys or bad values."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown rule option(s): {', '.join(sorted(unknown))}")
        kw = dict(data)
        for key in ("modalities", "body_parts", "destinations"):
            if key in kw:
                value = kw[key]
                if isinstance(value, str):
                    value = [value]
                kw[key] = tuple(str(v) for v in value)
        if "modalities" in kw:
            kw["modalities"] = tuple(m.upper() for m in kw["modalities"])
        if kw.get("output_spacing") is not None:
            kw["output_spacing"] = float(kw["output_spacing"])
        if kw.get("quiet_period_seconds") is not None:
            kw["quiet_period_seconds"] = float(kw["quiet_period_seconds"])
        return cls(**kw)

    def matches(
        self,
        modality: str | None,
        body_part: str | None,
        series_description: str | None,
        num_instances: int,
    ) -> bool:
        """Return whether a series with these attributes is selected by this rule."""
        return not self.mismatches(modality, body_part, series_description, num_instances)

    def mismatches(
        self,
        modality: str | None,
        body_part: str | None,
        series_description: str | None,
        num_instances: int,
    ) -> list[str]:
        """Why a series with these attributes is not selected (empty: it is).

        One sentence per condition of the rule the series fails (``GET /api/rules/test``).
        """
        why: list[str] = []
        if self.modalities and (modality or "").upper() not in self.modalities:
            why.append(f"modality {modality or '-'} is not one of {', '.join(self.modalities)}")
        if self.body_parts and (body_part or "").upper() not in {
            b.upper() for b in self.body_parts
        }:
            why.append(f"body part {body_part or '-'} is not one of {', '.join(self.body_parts)}")
        if self.series_description and not re.search(
            self.series_description, series_description or "", re.IGNORECASE
        ):
            why.append(f"series description does not match /{self.series_description}/")
        if num_instances < self.min_instances:
            why.append(f"{num_instances} instance(s), the rule needs at least "
                       f"{self.min_instances}")
        return why

    def job_params(self) -> JobParams:
        """Processing parameters stored on a job."""
        return JobParams(
            mode=self.mode,
            scale=self.scale,
            model=self.model,
            output_spacing=self.output_spacing,
            destinations=self.destinations,
        )
