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
from collections.abc import Callable
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


# --- Degradation families (robust training, the per-series estimate, the robustness benchmark) --
#
# In-plane (slice mode, factor N), on ``(B, 1, H, W)`` tensors in network units:
#
# * ``area``: box of N HR pixels convolved with a Gaussian PSF, ``sigma_n`` = sigma / N in
#   [0, 0.6] (0 = plain area averaging, 0.3 = the nominal operator);
# * ``lanczos``: antialiased Lanczos resampling (kernel stretched by N, ``lobes`` 2 or 3);
# * ``kspace``: MR acquisition of a lower matrix, centre crop of the 2-D spectrum with
#   ``window`` 0 (none), 1 (Hamming) or 2 (Fermi, radius ``fermi_radius`` of the crop's Nyquist);
# * ``decimate``: every N-th pixel, no antialiasing filter (aliased, off-centre by the sampling
#   phase); not a trained family: a stress case of the validation tables and the tests;
# * optional noise after the degradation: ``noise`` standard deviation in network units, added
#   (CT-like) or Rician (MR-like, ``rician`` = 1).
#
# Through-plane (volume mode, factor r): slab ``profile`` box, gaussian or sinc (a sinc-shaped
# slice profile with side lobes, Hann-tapered after two lobes), full width at half maximum
# ``fwhm`` times the slice spacing in [0.7, 1.3] (< 1: gaps, > 1: overlaps).
#
# Held-out split (never used for training, for the estimator, or for any tuning; reported apart
# by benchmarks/eval_robust.py): see HELD_OUT.  Training samplers draw outside these bands.

INPLANE_FAMILIES = ("area", "lanczos", "kspace")
SLAB_PROFILES = ("box", "gaussian", "sinc")
KSPACE_WINDOWS = {0: "none", 1: "hamming", 2: "fermi"}
HELD_OUT: dict[str, object] = {
    "area_sigma_n": (0.40, 0.45),      # sigma / N band never trained; evaluated at 0.42
    "lanczos_lobes": 2,                 # training uses 3 lobes; Lanczos-2 only evaluated
    "fermi_radius": (0.76, 0.80),      # Fermi window radius band; evaluated at 0.78
    "slab_fwhm": ((0.86, 0.94), (1.16, 1.24)),  # FWHM / spacing; evaluated at 0.9 and 1.2
}


@dataclass(frozen=True)
class Degradation:
    """One member of a degradation family.

    Attributes
    ----------
    family
        In-plane: ``area``, ``lanczos``, ``kspace``; through-plane: ``box``, ``gaussian``,
        ``sinc``.
    parameters
        Family parameters (see the module notes), plus optional ``noise`` and ``rician``.
    """

    family: str
    parameters: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, family: str, **parameters: float) -> Degradation:
        """Build from keyword parameters."""
        return cls(family, tuple(sorted((k, float(v)) for k, v in parameters.items())))

    def get(self, key: str, default: float = 0.0) -> float:
        """A parameter value, ``default`` when absent."""
        return dict(self.parameters).get(key, default)

    def label(self) -> str:
        """Short human-readable name, e.g. ``area(sigma_n=0.30)``."""
        inner = ", ".join(f"{k}={v:.2f}" for k, v in self.parameters)
        return f"{self.family}({inner})"


def _kernel_taps(factor: int, kernel: Callable[[np.ndarray], np.ndarray],
                 support: float) -> np.ndarray:
    """Taps of a symmetric continuous kernel (in HR pixels) centred on an LR sample."""
    pad = int(math.ceil(max(0.0, support - factor / 2)))
    n = factor + 2 * pad
    sub = 16
    centre = (factor - 1) / 2 + pad
    u = (np.arange(n * sub) + 0.5) / sub - 0.5 - centre
    w = np.asarray(kernel(u), dtype=np.float64).reshape(n, sub).mean(axis=1)
    return (w / w.sum()).astype(np.float32)


def lanczos_taps(factor: int, lobes: int = 3) -> np.ndarray:
    """Antialiased Lanczos-``lobes`` decimation taps (kernel stretched by ``factor``)."""
    def kernel(u: np.ndarray) -> np.ndarray:
        t = u / factor
        return np.where(np.abs(t) < lobes, np.sinc(t) * np.sinc(t / lobes), 0.0)

    return _kernel_taps(factor, kernel, lobes * factor)


def slab_kernel(profile: str, width: float) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """Continuous slab profile of full width at half maximum ``width`` and its support.

    Parameters
    ----------
    profile
        ``box``, ``gaussian`` or ``sinc``.
    width
        FWHM in the unit of the argument (HR pixels or mm).

    Returns
    -------
    tuple
        ``(kernel(u) -> weights, half support)``; the kernel is not normalised.
    """
    if profile == "box":
        return (lambda u: (np.abs(u) <= width / 2).astype(np.float64)), width / 2
    if profile == "gaussian":
        sigma = width / (2 * math.sqrt(2 * math.log(2)))
        return (lambda u: np.exp(-0.5 * (u / sigma) ** 2)), 3 * sigma
    if profile == "sinc":
        unit = width / 1.2067  # sinc(x) = 0.5 at |x| = 0.6034

        def kernel(u: np.ndarray) -> np.ndarray:
            t = u / unit
            return np.where(np.abs(t) < 3, np.sinc(t) * (0.5 + 0.5 * np.cos(np.pi * t / 3)), 0.0)

        return kernel, 3 * unit
    raise ValueError(f"unknown slab profile {profile!r}")


def slab_taps(factor: int, profile: str, fwhm: float) -> np.ndarray:
    """Through-plane slab profile taps for a slice spacing of ``factor`` HR pixels.

    Parameters
    ----------
    factor
        Slice spacing in HR pixels.
    profile
        ``box``, ``gaussian`` or ``sinc``.
    fwhm
        Full width at half maximum in units of the slice spacing.

    Returns
    -------
    numpy.ndarray
        Taps summing to one (see :func:`profile_taps` for the geometry).
    """
    if profile == "box":
        return profile_taps(factor, fwhm * factor, 0.0)
    kernel, support = slab_kernel(profile, fwhm * factor)
    return _kernel_taps(factor, kernel, support)


def profile_weights(out_centres: np.ndarray, out_spacing: float, in_centres: np.ndarray,
                    spacing: float, deg: Degradation) -> np.ndarray:
    """Weights of output slices in each input slab under an estimated slab profile.

    Parameters
    ----------
    out_centres, out_spacing
        Output slice centres and spacing (mm).
    in_centres, spacing
        Input slice centres and spacing (mm).
    deg
        Slab profile family member (``fwhm`` in units of ``spacing``).

    Returns
    -------
    numpy.ndarray
        ``(n_in, n_out)`` weights (not normalised), the profile integrated over each output
        slice.
    """
    width = deg.get("fwhm", 1.0) * spacing
    if deg.family == "box":
        return slab_weights(out_centres, out_spacing, in_centres, width)
    kernel, _ = slab_kernel(deg.family, width)
    d = out_centres[None, :] - in_centres[:, None]
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    return np.mean([kernel(d + t * out_spacing) for t in sub], axis=0)


def _kspace_crop(x: torch.Tensor, factor: int, window: int, fermi_radius: float) -> torch.Tensor:
    """Centre crop of the 2-D spectrum of ``(B, 1, H, W)``, LR samples at the pixel centres."""
    hgt, wid = x.shape[-2:]
    h, w = hgt // factor, wid // factor
    spec = torch.fft.fft2(x.double())
    ky = torch.fft.fftfreq(h, d=1.0 / h).to(torch.float64)  # integer frequencies of the LR grid
    kx = torch.fft.fftfreq(w, d=1.0 / w).to(torch.float64)
    iy = torch.remainder(ky.long(), hgt)
    ix = torch.remainder(kx.long(), wid)
    crop = spec[..., iy[:, None], ix[None, :]]
    # Shift so that LR sample i lies at HR coordinate i*N + (N-1)/2.
    shift = (factor - 1) / 2
    phase = torch.exp(2j * math.pi * shift * (ky[:, None] / hgt + kx[None, :] / wid))
    crop = crop * phase
    if window == 1:
        wy = 0.54 + 0.46 * torch.cos(2 * math.pi * ky / h)
        wx = 0.54 + 0.46 * torch.cos(2 * math.pi * kx / w)
        crop = crop * (wy[:, None] * wx[None, :])
    elif window == 2:
        r = torch.sqrt((ky[:, None] / (h / 2)) ** 2 + (kx[None, :] / (w / 2)) ** 2)
        crop = crop * torch.sigmoid(-(r - fermi_radius) / 0.04)
    out = torch.fft.ifft2(crop).real / (factor * factor)
    return out.to(x.dtype)


def add_noise(y: torch.Tensor, level: float, rician: bool,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian (CT-like) or Rician (MR-like) noise of standard deviation ``level``."""
    if level <= 0:
        return y
    n1 = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    if not rician:
        return y + level * n1
    n2 = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    return torch.sqrt((y + level * n1) ** 2 + (level * n2) ** 2)


def apply_inplane(x: torch.Tensor, factor: int, deg: Degradation,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Degrade ``(B, 1, H, W)`` in-plane by ``factor`` with a family member.

    Parameters
    ----------
    x
        High-resolution images (H, W multiples of ``factor``).
    factor
        Decimation factor.
    deg
        Family ``area``, ``lanczos`` or ``kspace`` and its parameters, or ``decimate``
        (every N-th pixel from ``phase_y`` / ``phase_x`` times N on, no antialiasing: a stress
        case, never trained on).
    gen
        Generator of the noise.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H/N, W/N)``.
    """
    if deg.family == "area":
        y = degrade_inplane(x, factor, deg.get("sigma_n") * factor)
    elif deg.family == "lanczos":
        taps = lanczos_taps(factor, int(deg.get("lobes", 3)))
        y = _decimate_axis(_decimate_axis(x, taps, factor, 2), taps, factor, 3)
    elif deg.family == "kspace":
        y = _kspace_crop(x, factor, int(deg.get("window")), deg.get("fermi_radius", 0.9))
    elif deg.family == "decimate":
        py = min(int(deg.get("phase_y") * factor), factor - 1)
        px = min(int(deg.get("phase_x") * factor), factor - 1)
        y = x[:, :, py::factor, px::factor].contiguous()
    else:
        raise ValueError(f"unknown in-plane family {deg.family!r}")
    return add_noise(y, deg.get("noise"), deg.get("rician") > 0.5, gen)


def apply_throughplane(x: torch.Tensor, factor: int, deg: Degradation,
                       gen: torch.Generator | None = None) -> torch.Tensor:
    """Slab degradation along H (dim 2) of ``(B, 1, H, W)`` with a slab-profile family member.

    Parameters
    ----------
    x
        High-resolution images whose H axis is the slice axis.
    factor
        Slice spacing ratio ``r``.
    deg
        Family ``box``, ``gaussian`` or ``sinc`` with parameter ``fwhm`` (times the spacing).
    gen
        Generator of the noise.

    Returns
    -------
    torch.Tensor
        ``(B, 1, H/r, W)``.
    """
    taps = slab_taps(factor, deg.family, deg.get("fwhm", 1.0))
    y = _decimate_axis(x, taps, factor, 2)
    return add_noise(y, deg.get("noise"), deg.get("rician") > 0.5, gen)


def _uniform_outside(u: float, lo: float, hi: float, bands: tuple[tuple[float, float], ...]
                     ) -> float:
    """Map ``u`` in [0, 1) uniformly onto ``[lo, hi]`` minus the held-out ``bands``."""
    pieces, start = [], lo
    for a, b in sorted(bands):
        pieces.append((start, a))
        start = b
    pieces.append((start, hi))
    total = sum(b - a for a, b in pieces)
    t = u * total
    for a, b in pieces:
        if t <= b - a:
            return a + t
        t -= b - a
    return hi


# Model groups of the in-plane families: one set of weights per group (see the model cards).
INPLANE_GROUPS = ("area_sharp", "area_soft", "lanczos", "kspace_sharp", "kspace_smooth")
# Training sets of the hedging slice-mode weights (no family of their own): ``blind`` draws from
# every group, ``hedge`` only from the groups that leave the input sharp-looking.  ``interp``
# (trained on HR band-limited at the LR Nyquist frequency, :class:`FamilyDegradation`) learns a
# better interpolation: plain k-space truncation without window, so nothing to deblur.
# (Adding aliased ``decimate`` to the hedge's training set was tried on 2026-12-06: with a
# quarter of the samples its loss on decimated validation inputs went from -0.36 to -0.27 dB,
# with three quarters -0.26, while its losses on smooth images grew: the sampling phase cannot
# be seen in the input, so the selection tables guard against it instead, see
# ``benchmarks/eval_robust.py`` VALIDATION_STRESS.)
MIXED_GROUPS = {"blind": INPLANE_GROUPS, "hedge": ("area_sharp", "lanczos", "kspace_sharp"),
                "interp": ("kspace_sharp",)}


def inplane_group(deg: Degradation) -> str:
    """The model group of an in-plane family member."""
    if deg.family == "area":
        return "area_sharp" if deg.get("sigma_n") < 0.3 else "area_soft"
    if deg.family == "lanczos":
        return "lanczos"
    if deg.family == "decimate":
        return "decimate"
    return "kspace_smooth" if int(deg.get("window")) == 1 else "kspace_sharp"


def sample_inplane(u: list[float], group: str | None = None) -> Degradation:
    """A training member of the in-plane families (held-out bands excluded).

    Parameters
    ----------
    u
        Five uniform numbers in [0, 1).
    group
        Restrict to one model group (:data:`INPLANE_GROUPS`), else any family.

    Returns
    -------
    Degradation
        The sampled member, noise included (half of the samples).
    """
    if group is None:
        group = INPLANE_GROUPS[min(int(u[0] * len(INPLANE_GROUPS)), len(INPLANE_GROUPS) - 1)]
    area_band = (HELD_OUT["area_sigma_n"],)  # type: ignore[assignment]
    noise = {"noise": 0.012 * u[3] ** 2, "rician": float(u[4] < 0.5)} if u[3] < 0.5 else {}
    if group == "area_sharp":
        return Degradation.of("area", sigma_n=0.3 * u[1], **noise)
    if group == "area_soft":
        return Degradation.of("area", sigma_n=_uniform_outside(u[1], 0.3, 0.6, area_band),
                              **noise)
    if group == "lanczos":
        return Degradation.of("lanczos", lobes=3, **noise)
    if group == "kspace_smooth":
        return Degradation.of("kspace", window=1, **noise)
    if u[1] < 0.5:
        return Degradation.of("kspace", window=0, **noise)
    radius = _uniform_outside(u[2], 0.7, 0.95, (HELD_OUT["fermi_radius"],))  # type: ignore[arg-type]
    return Degradation.of("kspace", window=2, fermi_radius=radius, **noise)


def sample_slab(u: list[float], profile: str | None = None) -> Degradation:
    """A training member of the slab-profile families (held-out FWHM bands excluded).

    Parameters
    ----------
    u
        Four uniform numbers in [0, 1).
    profile
        Restrict to one profile, else any.

    Returns
    -------
    Degradation
        The sampled member (noise on a third of the samples).
    """
    if profile is None:
        profile = SLAB_PROFILES[min(int(u[0] * 3), 2)]
    fwhm = _uniform_outside(u[1], 0.7, 1.3, HELD_OUT["slab_fwhm"])  # type: ignore[arg-type]
    noise = {"noise": 0.008 * u[3] ** 2, "rician": float(u[2] < 0.5)} if u[3] < 0.33 else {}
    return Degradation.of(profile, fwhm=fwhm, **noise)


@dataclass(frozen=True)
class FamilyDegradation:
    """Random family degradation for training (callable like :class:`RandomDegradation`).

    Attributes
    ----------
    mode
        ``slice`` or ``volume``.
    factor
        Scale factor.
    group
        Slice mode: an in-plane model group, or a mixed set of :data:`MIXED_GROUPS` (None: all);
        volume mode: a slab profile (None: all).
    """

    mode: str
    factor: int
    group: str | None = None

    def __call__(self, hr: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Degrade a batch ``(B, 1, H, W)`` with a per-sample random family member."""
        out = []
        for b in range(hr.shape[0]):
            u = torch.rand(5, generator=gen).tolist()
            x = hr[b:b + 1]
            if self.mode == "slice":
                group = self.group
                if group == "interp":
                    u[1] = 0.0  # k-space truncation without window
                if group in MIXED_GROUPS:
                    pool = MIXED_GROUPS[group]
                    group = pool[min(int(u[0] * len(pool)), len(pool) - 1)]
                out.append(apply_inplane(x, self.factor, sample_inplane(u, group), gen))
            else:
                out.append(apply_throughplane(x, self.factor, sample_slab(u, self.group), gen))
        return torch.cat(out, 0)


# --- Smooth-at-native-resolution HR images (issue 10: "smooth HR + sharp degradation") ------
#
# Real reconstructions are often band-limited at their own matrix: MR acquired at a lower matrix
# and zero-filled (interpolated) to the stored one, often with a raw-data window, and CT with soft
# kernels.  Degrading such an image with a sharp operator gives an input that looks like a sharp
# image degraded by blur: the two cannot be told apart from the input alone, so the validation
# set and the training data must contain both.

#: Fixed smooth-HR variants of the validation images (``benchmarks/eval_robust.py
#: --validation``): (label, kind, cut-off or sigma, window, noise before band-limiting).
SMOOTH_HR_VARIANTS: tuple[tuple[str, str, float, int, float], ...] = (
    ("zf.5 hamming", "zerofill", 0.5, 1, 0.0),      # 2x zero-filled MR with a raw-data filter
    ("zf.6 + noise", "zerofill", 0.6, 0, 0.006),    # 0.6 of the matrix acquired, noisy
    ("zf.75 fermi", "zerofill", 0.75, 2, 0.0),
    ("soft kernel 1.0", "gaussian", 1.0, 0, 0.004),  # soft CT kernel
)


def smooth_hr(img: np.ndarray, kind: str, amount: float, window: int = 0, noise: float = 0.0,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """Band-limit one HR image like a real reconstruction at its own matrix.

    Parameters
    ----------
    img
        ``(H, W)`` image in network units.
    kind
        ``zerofill``: only the central ``amount`` of the spectrum (fraction of the Nyquist
        frequency along each axis) is kept, optionally windowed, i.e. acquired at a lower
        matrix and interpolated by zero-filling; ``gaussian``: a soft kernel of standard
        deviation ``amount`` pixels.
    amount
        Cut-off fraction (``zerofill``) or sigma in pixels (``gaussian``).
    window
        ``zerofill`` only: 0 none, 1 Hamming, 2 Fermi (radius 0.9 of the cut-off) over the
        acquired part of the spectrum.
    noise
        Standard deviation of Gaussian noise added before band-limiting (acquisition noise,
        band-limited with the image).
    rng
        Generator of the noise (default: a fixed seed).

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)``.
    """
    out = np.asarray(img, dtype=np.float64)
    if noise > 0:
        gen = rng if rng is not None else np.random.default_rng(0)
        out = out + noise * gen.standard_normal(out.shape)
    if kind == "gaussian":
        from scipy import ndimage

        return ndimage.gaussian_filter(out, amount, mode="reflect").astype(np.float32)
    if kind != "zerofill":
        raise ValueError(f"unknown smooth-HR kind {kind!r}")
    fy = np.abs(np.fft.fftfreq(out.shape[0]))[:, None] / (0.5 * amount)
    fx = np.abs(np.fft.fftfreq(out.shape[1]))[None, :] / (0.5 * amount)
    mask = ((fy <= 1.0) & (fx <= 1.0)).astype(np.float64)
    if window == 1:
        mask = mask * (0.54 + 0.46 * np.cos(np.pi * np.minimum(fy, 1.0))) \
            * (0.54 + 0.46 * np.cos(np.pi * np.minimum(fx, 1.0)))
    elif window == 2:
        mask = mask / (1.0 + np.exp((np.sqrt(fy ** 2 + fx ** 2) - 0.9) / 0.04))
    return np.fft.ifft2(np.fft.fft2(out) * mask).real.astype(np.float32)


def random_smooth_hr(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random smooth-HR version of a training image (see :func:`smooth_hr`).

    Zero-filled spectra with cut-off 0.45-0.9 of Nyquist (no window, Hamming or Fermi; half of
    the draws) or a soft kernel of sigma 0.4-1.4 pixels, with acquisition noise on a third.
    """
    noise = float(rng.uniform(0.002, 0.01)) if rng.random() < 0.33 else 0.0
    if rng.random() < 0.5:
        return smooth_hr(img, "gaussian", float(rng.uniform(0.4, 1.4)), noise=noise, rng=rng)
    return smooth_hr(img, "zerofill", float(rng.uniform(0.45, 0.9)), int(rng.integers(3)),
                     noise, rng)


_A = Degradation.of
#: The robustness benchmark's in-plane degradations ``(label, member, held out)``: each family
#: at typical parameters plus the held-out bands (``benchmarks/eval_robust.py``, ``srnode
#: evaluate --degradations``).
BENCHMARK_INPLANE: list[tuple[str, Degradation, bool]] = [
    ("area s0", _A("area", sigma_n=0.0), False),
    ("area s.3 (nominal)", _A("area", sigma_n=0.3), False),
    ("area s.6", _A("area", sigma_n=0.6), False),
    ("lanczos3", _A("lanczos", lobes=3), False),
    ("kspace", _A("kspace", window=0), False),
    ("kspace hamming", _A("kspace", window=1), False),
    ("kspace fermi.9", _A("kspace", window=2, fermi_radius=0.9), False),
    ("area s.3 + noise", _A("area", sigma_n=0.3, noise=0.004), False),
    ("area s.42", _A("area", sigma_n=0.42), True),
    ("lanczos2", _A("lanczos", lobes=2), True),
    ("kspace fermi.78", _A("kspace", window=2, fermi_radius=0.78), True),
]
#: The robustness benchmark's slab profiles ``(label, member, held out)``.
BENCHMARK_SLAB: list[tuple[str, Degradation, bool]] = [
    ("box 1.0", _A("box", fwhm=1.0), False), ("box 0.7 gap", _A("box", fwhm=0.7), False),
    ("box 1.3 overlap", _A("box", fwhm=1.3), False),
    ("gauss 0.7", _A("gaussian", fwhm=0.7), False), ("gauss 1.0", _A("gaussian", fwhm=1.0), False),
    ("gauss 1.3", _A("gaussian", fwhm=1.3), False),
    ("sinc 0.7", _A("sinc", fwhm=0.7), False), ("sinc 1.0", _A("sinc", fwhm=1.0), False),
    ("sinc 1.3", _A("sinc", fwhm=1.3), False),
    ("box 0.9", _A("box", fwhm=0.9), True), ("gauss 1.2", _A("gaussian", fwhm=1.2), True),
    ("sinc 1.2", _A("sinc", fwhm=1.2), True),
]
