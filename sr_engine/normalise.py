"""Intensity mappings between modality units and network units.

CT uses one fixed Hounsfield mapping for every series; MR uses a per-series factor that is a
power of two, so dividing and multiplying by it is exact in floating point (no per-slice
min-max anywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CT_OFFSET_HU = 1024.0
CT_SCALE_HU = 4096.0


@dataclass(frozen=True)
class IntensityMapping:
    """Affine map ``net = (value + offset) / scale`` with its exact inverse.

    Attributes
    ----------
    offset
        Added before scaling (modality units).
    scale
        Divisor (modality units); a power of two.
    lower_bound
        Smallest physically plausible value in modality units.
    """

    offset: float
    scale: float
    lower_bound: float

    def forward(self, values: np.ndarray) -> np.ndarray:
        """Map modality units to network units (float32)."""
        out = np.array(values, dtype=np.float32, copy=True)
        out += np.float32(self.offset)
        out /= np.float32(self.scale)
        return out

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Map network units back to modality units (float32)."""
        return (np.asarray(values, dtype=np.float32) * np.float32(self.scale)
                - np.float32(self.offset)).astype(np.float32)

    def inverse_inplace(self, values: np.ndarray) -> np.ndarray:
        """Map a float32 array from network to modality units in place and return it."""
        values *= np.float32(self.scale)
        values -= np.float32(self.offset)
        return values


def mapping_for(volume: np.ndarray, modality: str) -> IntensityMapping:
    """Choose the intensity mapping of a series.

    Parameters
    ----------
    volume
        The series in modality units.
    modality
        DICOM Modality (``CT``, ``MR``, anything else is treated like MR).

    Returns
    -------
    IntensityMapping
        CT: ``(HU + 1024) / 4096``; otherwise ``value / 2**ceil(log2(p99.5))``.
    """
    if modality.upper() == "CT":
        return IntensityMapping(CT_OFFSET_HU, CT_SCALE_HU, -1024.0)
    finite = volume[np.isfinite(volume)]
    p = float(np.percentile(np.abs(finite), 99.5)) if finite.size else 1.0
    scale = 2.0 ** math.ceil(math.log2(p)) if p > 0 else 1.0
    lower = 0.0 if finite.size and float(finite.min()) >= 0 else float(finite.min())
    return IntensityMapping(0.0, scale, lower)
