"""Degradation operators: how low-resolution data arise from high-resolution data.

Both operators integrate the high-resolution signal over a slice/pixel profile and decimate:

* in-plane (``slice`` mode, factor ``N``): separable profile = box of width ``N`` HR pixels
  (detector area) convolved with a Gaussian PSF; nominal ``sigma = 0.3 N``.
* through-plane (``volume`` mode, factor ``r``): slab profile along z = box of width ``t``
  (slice thickness, ``t <= r`` models a gap) optionally convolved with a Gaussian; nominal:
  plain box of width ``r`` (thick slab = mean of the thin slices it covers).

The LR sample ``i`` is centred on HR coordinate ``i*N + (N-1)/2`` (pixel centres), which is
the geometry of ``torch.nn.functional.interpolate(..., align_corners=False)`` and of the
slab partition used for output slice offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

NOMINAL_INPLANE_SIGMA = 0.3  # times the factor, in HR pixels


def profile_taps(factor: int, width: float, sigma: float, pad: int | None = None) -> np.ndarray:
    """Weights of one LR sample over HR pixels.

    Parameters
    ----------
    factor
        Decimation factor.
    width
        Box width in HR pixels (``factor`` = contiguous, smaller = gap).
    sigma
        Gaussian blur in HR pixels applied on top of the box (0 = none).
    pad
        Extra taps on each side of the ``factor`` central taps (default: from ``sigma``).

    Returns
    -------
    numpy.ndarray
        ``factor + 2*pad`` non-negative weights summing to one; tap ``k`` covers HR pixel
        ``i*factor - pad + k`` for LR sample ``i``.
    """
    if pad is None:
        pad = int(math.ceil(max(0.0, (width - factor) / 2) + 3 * sigma))
    sub = 32
    n = factor + 2 * pad
    centre = (factor - 1) / 2 + pad
    u = (np.arange(n * sub) + 0.5) / sub - 0.5 - centre
    if sigma > 1e-6:
        s = sigma * math.sqrt(2.0)
        from scipy.special import erf

        g = 0.5 * (erf((u + width / 2) / s) - erf((u - width / 2) / s))
    else:
        g = (np.abs(u) <= width / 2).astype(np.float64)
    w = g.reshape(n, sub).mean(axis=1)
    return (w / w.sum()).astype(np.float32)


def _decimate_axis(x: torch.Tensor, taps: np.ndarray, factor: int, axis: int) -> torch.Tensor:
    """Integrate with ``taps`` and decimate a ``(B, 1, H, W)`` tensor along H (2) or W (3)."""
    pad = (len(taps) - factor) // 2
    k = torch.as_tensor(taps, dtype=x.dtype, device=x.device)
    if axis == 2:
        x = F.pad(x, (0, 0, pad, pad), mode="replicate") if pad else x
        return F.conv2d(x, k.view(1, 1, -1, 1), stride=(factor, 1))
    x = F.pad(x, (pad, pad, 0, 0), mode="replicate") if pad else x
    return F.conv2d(x, k.view(1, 1, 1, -1), stride=(1, factor))


def degrade_inplane(x: torch.Tensor, factor: int, sigma: float | None = None) -> torch.Tensor:
    """In-plane degradation of ``(B, 1, H, W)`` (H, W multiples of ``factor``).

    Parameters
    ----------
    x
        High-resolution images.
    factor
        Decimation factor ``N``.
    sigma
        Gaussian PSF in HR pixels (default: nominal ``0.3 N``).

    Returns
    -------
    torch.Tensor
        ``(B, 1, H/N, W/N)``.
    """
    s = NOMINAL_INPLANE_SIGMA * factor if sigma is None else sigma
    taps = profile_taps(factor, float(factor), s)
    return _decimate_axis(_decimate_axis(x, taps, factor, 2), taps, factor, 3)


def degrade_throughplane(x: torch.Tensor, factor: int, width: float | None = None,
                         sigma: float = 0.0) -> torch.Tensor:
    """Through-plane (slab) degradation along H (dim 2) of ``(B, 1, H, W)``.

    Parameters
    ----------
    x
        High-resolution images whose H axis is the slice axis.
    factor
        Slice spacing ratio ``r``.
    width
        Slab thickness in HR pixels (default ``r``: contiguous slabs).
    sigma
        Extra Gaussian smoothing of the slice profile in HR pixels.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H/r, W)``.
    """
    taps = profile_taps(factor, float(factor if width is None else width), sigma)
    return _decimate_axis(x, taps, factor, 2)


@dataclass(frozen=True)
class RandomDegradation:
    """Random degradation parameters for training.

    Attributes
    ----------
    mode
        ``slice`` or ``volume``.
    factor
        Scale factor.
    box_probability
        Volume mode: probability of the nominal profile (contiguous box slabs of ``factor``
        slices, exactly the evaluation degradation); otherwise a random profile with gaps/blur.
    """

    mode: str
    factor: int
    box_probability: float = 0.5

    def __call__(self, hr: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Degrade a batch ``(B, 1, H, W)`` with per-sample random profile and noise."""
        out = []
        for b in range(hr.shape[0]):
            r = torch.rand(4, generator=gen).tolist()
            x = hr[b:b + 1]
            if self.mode == "slice":
                sigma = (0.15 + 0.3 * r[0]) * self.factor
                y = degrade_inplane(x, self.factor, sigma)
            else:
                if r[0] < self.box_probability:
                    y = degrade_throughplane(x, self.factor)
                else:
                    width = self.factor * (0.7 + 0.3 * r[1])
                    sigma = 0.4 * self.factor * r[2]
                    y = degrade_throughplane(x, self.factor, width, sigma)
            if r[3] < 0.5:
                level = 0.004 * float(torch.rand(1, generator=gen))
                y = y + level * torch.randn(y.shape, generator=gen)
            out.append(y)
        return torch.cat(out, 0)


def slab_weights(out_centres: np.ndarray, out_thickness: float, in_centres: np.ndarray,
                 in_thickness: float) -> np.ndarray:
    """Overlap matrix between input slabs and output slices along z.

    Parameters
    ----------
    out_centres, out_thickness
        Output slice centres (mm) and thickness.
    in_centres, in_thickness
        Input slab centres (mm) and thickness.

    Returns
    -------
    numpy.ndarray
        ``(n_in, n_out)`` overlap lengths in mm.
    """
    a, b = in_centres[:, None], out_centres[None, :]
    lo = np.maximum(a - in_thickness / 2, b - out_thickness / 2)
    hi = np.minimum(a + in_thickness / 2, b + out_thickness / 2)
    return np.clip(hi - lo, 0.0, None)
