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


class MagnitudeStats:
    """Series statistics for :func:`mapping_for`, gathered slab by slab in bounded memory.

    The MR mapping only needs the power of two above the 99.5th percentile of ``|value|``:
    counting the values per power-of-two bracket, with each bracket's smallest and largest
    value, gives that percentile's bracket exactly (``numpy.percentile``'s linear interpolation
    included), without keeping the values.
    """

    #: Brackets ``(2**(e-1), 2**e]`` for ``e`` in ``[-OFFSET, 2*OFFSET)``; 0 has its own.
    OFFSET = 160

    def __init__(self) -> None:
        size = 3 * self.OFFSET + 1
        self.counts = np.zeros(size, dtype=np.int64)
        self.lows = np.full(size, np.inf)
        self.highs = np.full(size, -np.inf)
        self.minimum = math.inf

    def add(self, values: np.ndarray) -> None:
        """Count the finite values of one slice or slab (modality units)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return
        self.minimum = min(self.minimum, float(v.min()))
        a = np.abs(v)
        mant, exp = np.frexp(a)  # a = mant * 2**exp, mant in [0.5, 1)
        e = np.where(mant == 0.5, exp - 1, exp)  # a in (2**(e-1), 2**e]
        idx = np.where(a == 0, 0, np.clip(e + self.OFFSET, 1, self.counts.size - 1))
        self.counts += np.bincount(idx, minlength=self.counts.size)
        np.minimum.at(self.lows, idx, a)
        np.maximum.at(self.highs, idx, a)

    def add_repeated(self, value: float, count: int) -> None:
        """Count ``value`` ``count`` times (e.g. the fill value of padding voxels)."""
        if count <= 0 or not math.isfinite(value):
            return
        self.minimum = min(self.minimum, float(value))
        a = abs(float(value))
        mant, exp = math.frexp(a)
        e = exp - 1 if mant == 0.5 else exp
        idx = 0 if a == 0 else int(np.clip(e + self.OFFSET, 1, self.counts.size - 1))
        self.counts[idx] += count
        self.lows[idx] = min(self.lows[idx], a)
        self.highs[idx] = max(self.highs[idx], a)

    def merge(self, other: MagnitudeStats) -> None:
        """Add the counts of another slice's statistics."""
        self.counts += other.counts
        np.minimum(self.lows, other.lows, out=self.lows)
        np.maximum(self.highs, other.highs, out=self.highs)
        self.minimum = min(self.minimum, other.minimum)

    def percentile(self, q: float) -> float:
        """``numpy.percentile(|values|, q)`` when it lies within one bracket, else its bracket.

        Exact when the two order statistics it interpolates between fall into one bracket or
        into neighbouring ones (they are then the first bracket's largest and the next one's
        smallest value); the mapping only needs the bracket.
        """
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        pos = q / 100.0 * (total - 1)
        lo_rank, hi_rank = int(math.floor(pos)), int(math.ceil(pos))
        cum = np.cumsum(self.counts)
        b_lo = int(np.searchsorted(cum, lo_rank, side="right"))
        b_hi = int(np.searchsorted(cum, hi_rank, side="right"))
        if b_lo == b_hi:
            if self.lows[b_lo] == self.highs[b_lo]:
                return float(self.lows[b_lo])
            return float(self.highs[b_lo])  # same bracket: only the bracket matters
        frac = pos - lo_rank
        return float(self.highs[b_lo] + frac * (self.lows[b_hi] - self.highs[b_lo]))


def mapping_from_stats(stats: MagnitudeStats, modality: str) -> IntensityMapping:
    """:func:`mapping_for` from :class:`MagnitudeStats` instead of the whole volume."""
    if modality.upper() == "CT":
        return IntensityMapping(CT_OFFSET_HU, CT_SCALE_HU, -1024.0)
    total = int(stats.counts.sum())
    p = stats.percentile(99.5) if total else 1.0
    scale = 2.0 ** math.ceil(math.log2(p)) if p > 0 else 1.0
    lower = 0.0 if total and stats.minimum >= 0 else (stats.minimum if total else 0.0)
    return IntensityMapping(0.0, scale, float(lower))
