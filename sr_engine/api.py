"""Public request/result types of the SR engine.

The engine works on arrays in modality units with physical spacing; it never sees a DICOM
dataset.  ``dicom_node`` adapts a loaded series to :class:`EnhanceRequest` inputs and builds the
derived series from :class:`EnhanceResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Mode = Literal["slice", "volume"]


@dataclass(frozen=True)
class EnhanceRequest:
    """What to do with a volume.

    Parameters
    ----------
    mode
        ``"slice"``: in-plane super-resolution of every slice; ``"volume"``: through-plane
        (thick to thin slices).
    scale
        Integer factor: 2 or 4 in slice mode, 2, 3 or 4 in volume mode.
    model
        Registered model name (``fast``, ``srcnn``, ``residual``, ``srgan``, ``bicubic``,
        ``cubic``, ``linear``) or ``"auto"`` (``fast`` on CPU, the best model on GPU).
    device
        ``"auto"``, ``"cuda"`` or ``"cpu"``; ``auto`` falls back to the CPU.
    batch_size
        Slices (or tiles) per forward pass.
    tile_size
        Largest tile edge in LR pixels; larger inputs are tiled with overlap and blended.
    tile_overlap
        Overlap between tiles in LR pixels.
    output_spacing
        Volume mode only: requested output slice spacing in mm (``None``: input spacing / scale).
    self_ensemble
        Geometric self-ensemble at inference (EDSR+ style): run the network also on flipped
        copies of every plane stack (volume mode: flipped along z and along the in-plane axis,
        4 variants per plane orientation; slice mode: the 8 flips/transposes of the square
        grid), undo the flips and average.  ``None`` = the mode's default
        (:data:`SELF_ENSEMBLE_DEFAULT`: on in volume mode, off in slice mode where it would
        cost 8x the time).
    estimate_degradation
        Estimate the series' degradation first (:mod:`sr_engine.estimate`), pick the weights
        made for it, or fall back to the interpolation baseline when the estimate is uncertain
        or outside every trained family.  ``False``: the nominal weights, no estimate (the
        behaviour before degradation families existed).
    adapt_seconds
        Volume mode: seconds of per-series self-supervised fine-tuning (pairs from the series'
        own in-plane slices degraded with the estimated slab profile) before inference;
        0 = none.
    precision
        ``"auto"``: mixed precision (float16 autocast) on CUDA, float32 on the CPU;
        ``"float32"``: float32 everywhere (bit-stable across runs on one device);
        ``"mixed"``: autocast on any device (bfloat16 on the CPU: slower there, it exists so
        the mixed-precision code path can be tested on machines without a GPU).
    """

    mode: Mode = "slice"
    scale: int = 2
    model: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    tile_size: int = 256
    tile_overlap: int = 16
    output_spacing: float | None = None
    self_ensemble: bool | None = None
    estimate_degradation: bool = True
    adapt_seconds: float = 0.0
    precision: str = "auto"


#: Accepted ``EnhanceRequest.precision`` values.
PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed")


def uses_mixed_precision(precision: str, device: str) -> bool:
    """Whether inference with ``precision`` on ``device`` runs under autocast.

    Parameters
    ----------
    precision
        ``EnhanceRequest.precision``.
    device
        The resolved device, ``cpu`` or ``cuda``.

    Returns
    -------
    bool
        True for ``mixed``, and for ``auto`` on CUDA.
    """
    return precision == "mixed" or (precision == "auto" and device == "cuda")


# ``EnhanceRequest.self_ensemble = None``: on in volume mode (4 passes per plane orientation of a
# cheap through-plane model), off in slice mode (8 passes would break the 4 slices/s budget of
# ``fast`` at 512x512 x2 on 2 CPU cores).
SELF_ENSEMBLE_DEFAULT: dict[str, bool] = {"slice": False, "volume": True}


def resolve_self_ensemble(mode: str, requested: bool | str | None) -> bool:
    """Whether a request in ``mode`` uses the geometric self-ensemble.

    Parameters
    ----------
    mode
        ``slice`` or ``volume``.
    requested
        ``True``/``False``, or ``None``/``"auto"`` for the mode's default.

    Returns
    -------
    bool
        The effective setting.
    """
    if requested is None or requested == "auto":
        return SELF_ENSEMBLE_DEFAULT.get(mode, False)
    return bool(requested)


@dataclass(frozen=True)
class DegradationEstimate:
    """What degraded a series, as estimated from the series itself.

    Attributes
    ----------
    family
        Slice mode: the in-plane model group (``area_sharp``, ``area_soft``, ``lanczos``,
        ``kspace_sharp``, ``kspace_smooth``); volume mode: the slab profile (``box``,
        ``gaussian``, ``sinc``); ``unknown`` when no estimate could be made.
    parameters
        Family parameters (``sigma_n`` = PSF sigma / factor, ``window``, ``fwhm`` = slab FWHM /
        spacing, ...) and diagnostics (``distance``, ``anisotropy``, ``misfit``).
    confidence
        0..1 (class probability, or the misfit gap to the next profile family).
    in_family
        Whether the series lies inside the trained families.
    mode
        ``slice`` (in-plane estimate) or ``volume`` (slab profile estimate).
    reason
        Why ``in_family`` is False (None otherwise).
    operator
        The degradation family of the operator used by the consistency check.
    seconds
        Wall time of the estimate.
    """

    family: str
    parameters: dict[str, float] = field(default_factory=dict)
    confidence: float = 0.0
    in_family: bool = False
    mode: str = "slice"
    reason: str | None = None
    operator: str | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """One short sentence, e.g. ``degradation area_soft (sigma_n 0.32), confidence 0.93``."""
        keys = ("sigma_n", "fwhm", "window")
        shown = ", ".join(f"{k} {self.parameters[k]:g}" for k in keys if k in self.parameters)
        text = f"degradation {self.family}{f' ({shown})' if shown else ''}"
        text += f", confidence {self.confidence:.2f}"
        return text if self.in_family else text + ", outside trained families"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready record (job record, audit log)."""
        return {"family": self.family, "parameters": dict(self.parameters),
                "confidence": self.confidence, "in_family": self.in_family, "mode": self.mode,
                "reason": self.reason, "operator": self.operator,
                "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class ConsistencyReport:
    """Re-degradation check: degrade the output with the task's operator and compare to the input.

    All errors are in modality units (HU for CT).
    """

    mean_abs_error: float
    max_abs_error: float
    psnr: float


@dataclass
class EnhanceResult:
    """An enhanced volume and the facts needed to describe it.

    Attributes
    ----------
    volume
        float32 array ``(z, y, x)`` in modality units (not yet rounded or clipped); for a
        series enhanced slab by slab (:mod:`sr_engine.stream`) a read-only zero-stride view
        that only gives the output shape (the voxels were handed out slab by slab).
    spacing
        ``(dz, dy, dx)`` in mm of the output grid (``dz`` is centre-to-centre slice spacing).
    slice_thickness
        Nominal thickness of each output slice in mm.
    slice_offsets
        For each output slice, its centre position along the slice normal in mm, relative to the
        centre of input slice 0 (slice mode: equal to the input offsets).
    contributing_slices
        For each output slice, the indices of the input slices that contributed to it.
    consistency
        The re-degradation check.
    model_name, model_version
        The model actually used (after ``auto`` and any fallback) and its weights version.
    device
        The device the inference ran on (``"cpu"`` or ``"cuda"``).
    seconds
        Wall time of the inference.
    degradation
        The per-series degradation estimate (None when not requested).
    fallback_reason
        Why the interpolation baseline was used instead of the requested model (None when the
        model was used); ``model_name`` is then the baseline's name.
    adaptation
        Per-series adaptation facts (``seconds``, ``steps``, ``loss_before``, ``loss_after``),
        None when not adapted.
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    slice_thickness: float
    slice_offsets: list[float]
    contributing_slices: list[list[int]]
    consistency: ConsistencyReport
    model_name: str
    model_version: str
    device: str
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    degradation: DegradationEstimate | None = None
    fallback_reason: str | None = None
    adaptation: dict[str, float | str] | None = None

    @property
    def interpolated(self) -> bool:
        """Whether the volume is an interpolation (a fallback or an interpolation model), not SR."""
        from .tasks import is_interpolation

        return is_interpolation(self.model_name, self.fallback_reason)

    def describe(self) -> str:
        """Short sentence (< 200 characters) on the estimate and the choice, for provenance.

        E.g. ``SR fast (area_soft weights); degradation area_soft (sigma_n 0.31), confidence
        0.95`` or ``interpolation bicubic: estimate uncertain (confidence 0.41)``.
        """
        if self.fallback_reason:
            text = f"interpolation {self.model_name}: {self.fallback_reason}"
        elif self.interpolated:  # an interpolation named explicitly (e.g. a rule's model)
            text = f"interpolation {self.model_name}"
        else:
            group = self.extra.get("weights_group")
            text = f"SR {self.model_name}"
            if group:  # "hedge@0.5": the hedge weights with half their residual over cubic
                from .models import split_group

                base, alpha = split_group(str(group))
                text += f" ({base} weights" + (f", residual x{alpha:g})" if alpha != 1 else ")")
        if self.degradation is not None and not self.fallback_reason:
            text += "; " + self.degradation.describe()
        if self.adaptation:
            text += f"; adapted {self.adaptation.get('seconds', 0.0):.0f} s"
        return text[:199]
