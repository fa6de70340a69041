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
        float32 array ``(z, y, x)`` in modality units (not yet rounded or clipped).
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
