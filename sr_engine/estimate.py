"""Per-series degradation estimate: which family made a series, how sure, inside a family.

Two estimators, both CPU-cheap and aggregated over the slices of a series:

* **in-plane** (slice mode): a blind classifier on spectral-shape features of the input
  slices (log power of the 2-D spectrum folded into 8x8 frequency bins, contrast removed).
  It is a small multilayer perceptron trained on the degradation families of
  :mod:`sr_engine.degrade` applied to scikit-image natural images and the project's phantoms
  (never to evaluation data), shipped as ``weights/estimator_slice_x<N>.safetensors`` with the
  feature statistics needed to tell "outside every trained family" (a Mahalanobis distance and a
  transpose-anisotropy score above what training ever produced, e.g. motion-like or anisotropic
  blur) from "uncertain" (low class probability).
* **through-plane** (volume mode): the series' own in-plane data are the high-resolution
  reference (SMORE/ECLARE idea).  Each candidate slab profile (box, Gaussian, sinc; FWHM 0.7 to
  1.3 times the spacing) degrades in-plane lines by the slice ratio; the candidate whose
  spectrum matches the spectrum along z best is the estimate.  This discriminates because the
  reference is real high-resolution signal, not a re-degraded input.

Neither estimator runs a super-resolution model (the pitfall of issue 10: "re-degrade the
input, run the model, compare" favours the model's own training degradation on every input).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .api import DegradationEstimate
from .degrade import (
    INPLANE_GROUPS,
    SLAB_PROFILES,
    Degradation,
    _decimate_axis,
    apply_inplane,
    inplane_group,
    sample_inplane,
    slab_taps,
)
from .models import WEIGHTS_DIR
from .tasks import is_interpolation

GRID = 8  # frequency bins per axis of the folded spectrum
MAX_SLICES = 12  # slices of a series used by the estimate (evenly spaced)
MAX_EDGE = 192  # central crop edge of each slice used by the estimate
MIN_CONFIDENCE = 0.6  # below: "uncertain", the node falls back to interpolation
MIN_EXPECTED_GAIN_DB = 0.0  # slice mode: at or below, interpolation (see expected_gains)
# Slice mode, ``by_estimate`` tables: weights only when the worst validation gain of the
# estimate's cell is above this margin.  Chosen on the validation set, leave-one-volume-out
# (2026-12-06, with the residual-scaled candidates and the aliased/off-grid stress cases): at
# 0 one left-out case lost 0.16 dB, at 0.25 none lost more than 0.07 (a worst case over a few
# dozen cases is an optimistic bound for the next series).
MIN_CELL_WORST_DB = 0.25
FWHM_GRID = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
# Through-plane: a best spectral misfit above this (mean squared log-power difference over the
# high bands) is outside every profile family.  Calibrated on the synthetic 3-D phantoms.
SLAB_MAX_MISFIT = 0.25
SLAB_BANDS = 8  # frequency bands of the z spectrum (fewer for short series)
SLAB_MISFIT_SCALE = 0.15  # confidence = exp(-misfit / scale): 0.6 at a misfit of 0.077


def _hann2(h: int, w: int) -> np.ndarray:
    return np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)


def _central_crop(img: np.ndarray) -> np.ndarray | None:
    """The central ``MAX_EDGE`` square (or less) of a 2-D image as float64; None under 16 px."""
    h, w = img.shape
    if min(h, w) < 16:
        return None
    ch, cw = min(h, MAX_EDGE), min(w, MAX_EDGE)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return np.asarray(img[y0:y0 + ch, x0:x0 + cw], dtype=np.float64)


def _series_picks(n: int) -> np.ndarray:
    """Up to :data:`MAX_SLICES` evenly spaced slice indices of an ``n``-slice series."""
    return np.unique(np.linspace(0, n - 1, min(n, MAX_SLICES)).round().astype(int))


def spectral_features(img: np.ndarray) -> np.ndarray | None:
    """Spectral-shape features of one 2-D image (network units).

    Parameters
    ----------
    img
        ``(H, W)`` image, at least 16 pixels each way.

    Returns
    -------
    numpy.ndarray or None
        ``GRID*GRID`` log band powers of the Hann-windowed 2-D spectrum, folded onto
        ``|fy|, |fx|`` in [0, 0.5], minus their mean; None for a (nearly) flat image.
    """
    x = _central_crop(img)
    if x is None:
        return None
    ch, cw = x.shape
    x = x - x.mean()
    if float(x.std()) < 1e-4:
        return None
    p = np.abs(np.fft.fft2(x * _hann2(ch, cw))) ** 2
    fy = np.abs(np.fft.fftfreq(ch))
    fx = np.abs(np.fft.fftfreq(cw))
    by = np.minimum((fy / 0.5 * GRID).astype(int), GRID - 1)
    bx = np.minimum((fx / 0.5 * GRID).astype(int), GRID - 1)
    idx = by[:, None] * GRID + bx[None, :]
    sums = np.bincount(idx.ravel(), weights=p.ravel(), minlength=GRID * GRID)
    counts = np.bincount(idx.ravel(), minlength=GRID * GRID)
    f = np.log(sums / np.maximum(counts, 1) + 1e-12)
    return (f - f.mean()).astype(np.float32)


def anisotropy(features: np.ndarray) -> float:
    """Mean absolute difference between the folded spectrum and its transpose."""
    g = features.reshape(GRID, GRID)
    return float(np.abs(g - g.T).mean())


def series_features(volume: np.ndarray) -> np.ndarray | None:
    """Mean spectral features over up to :data:`MAX_SLICES` evenly spaced slices of a series."""
    feats = [f for f in (spectral_features(volume[i]) for i in _series_picks(volume.shape[0]))
             if f is not None]
    return np.mean(feats, axis=0) if feats else None


#: Immerkaer's noise mask: zero on planes and linear ramps, gain 6 on white noise.
_NOISE_MASK = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def noise_level(volume: np.ndarray) -> float:
    """Robust estimate of the input's white-noise standard deviation (network units).

    Immerkaer's Laplacian-difference mask (which cancels planes and ramps) applied to the
    central crops of up to :data:`MAX_SLICES` evenly spaced slices; the median absolute
    response / 0.6745 / 6 (the mask's gain on white noise), so that edges count little.
    Returns 0 for slices smaller than 16 pixels.
    """
    responses = []
    for i in _series_picks(volume.shape[0]):
        x = _central_crop(volume[i])
        if x is None:
            continue
        ch, cw = x.shape
        r = sum(_NOISE_MASK[a, b] * x[a:ch - 2 + a, b:cw - 2 + b]
                for a in range(3) for b in range(3))
        responses.append(np.abs(r).ravel())
    if not responses:
        return 0.0
    return float(np.median(np.concatenate(responses)) / 0.6745 / 6.0)


class InplaneEstimator(torch.nn.Module):
    """Classifier of the in-plane model group plus a regression of ``sigma_n``.

    Parameters
    ----------
    classes
        Number of model groups.
    """

    def __init__(self, classes: int = len(INPLANE_GROUPS)) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(GRID * GRID, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, classes + 1))
        self.register_buffer("mean", torch.zeros(GRID * GRID))
        self.register_buffer("std", torch.ones(GRID * GRID))
        self.register_buffer("precision", torch.eye(GRID * GRID))
        self.register_buffer("max_distance", torch.tensor(1e9))
        self.register_buffer("max_anisotropy", torch.tensor(1e9))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Logits of the groups and the ``sigma_n`` regression (last column)."""
        return self.net((f - self.mean) / self.std)

    def distance(self, f: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of features to the training distribution."""
        d = (f - self.mean) / self.std
        return torch.sqrt(torch.einsum("bi,ij,bj->b", d, self.precision, d).clamp_min(0))


def estimator_path(scale: int, weights_dir: Path | None = None) -> Path:
    """Shipped estimator weights for in-plane scale ``scale``."""
    return Path(weights_dir or WEIGHTS_DIR) / f"estimator_slice_x{scale}.safetensors"


_ESTIMATORS: dict[str, InplaneEstimator] = {}


def load_estimator(scale: int, weights_dir: Path | None = None) -> InplaneEstimator | None:
    """The in-plane estimator for ``scale`` (shipped weights), or None when not trained."""
    path = estimator_path(scale, weights_dir)
    if not path.is_file():
        path = estimator_path(scale)
    if not path.is_file():
        return None
    key = str(path)
    if key not in _ESTIMATORS:
        est = InplaneEstimator()
        est.load_state_dict(load_file(str(path)))
        _ESTIMATORS[key] = est.eval()
    return _ESTIMATORS[key]


def _group_member(group: str, sigma_n: float) -> Degradation:
    """A representative member of a model group (the operator used by the consistency check)."""
    if group.startswith("area"):
        lo, hi = (0.0, 0.3) if group == "area_sharp" else (0.3, 0.6)
        return Degradation.of("area", sigma_n=float(np.clip(sigma_n, lo, hi)))
    if group == "lanczos":
        return Degradation.of("lanczos", lobes=3)
    if group == "kspace_smooth":
        return Degradation.of("kspace", window=1)
    return Degradation.of("kspace", window=0)


def estimate_inplane(volume: np.ndarray, scale: int,
                     weights_dir: Path | None = None) -> DegradationEstimate:
    """Estimate the in-plane degradation of a series (slice mode).

    Parameters
    ----------
    volume
        ``(z, y, x)`` in network units (see :mod:`sr_engine.normalise`).
    scale
        The requested in-plane factor (selects the estimator).
    weights_dir
        Optional folder with estimator weights (default: shipped).

    Returns
    -------
    DegradationEstimate
        Family (the model group), parameters (``sigma_n`` for area groups), confidence (class
        probability) and whether the series lies inside the trained families.
    """
    t0 = time.perf_counter()
    est = load_estimator(scale, weights_dir)
    feats = series_features(volume)
    if est is None or feats is None:
        why = "no estimator for this scale" if est is None else "flat or too small images"
        return DegradationEstimate("unknown", {}, 0.0, False, "slice", why,
                                   seconds=time.perf_counter() - t0)
    with torch.inference_mode():
        f = torch.from_numpy(feats)[None]
        out = est(f)[0]
        prob = torch.softmax(out[:-1], 0)
        dist = float(est.distance(f)[0])
    k = int(prob.argmax())
    group = INPLANE_GROUPS[k]
    aniso = anisotropy(feats)
    params = {"distance": round(dist, 3), "anisotropy": round(aniso, 4),
              "noise": round(noise_level(volume), 5)}
    params.update({f"p_{g}": round(float(prob[i]), 4) for i, g in enumerate(INPLANE_GROUPS)})
    if group.startswith("area"):
        params["sigma_n"] = round(float(np.clip(out[-1], 0.0, 0.6)), 3)
    member = _group_member(group, params.get("sigma_n", 0.0))
    params.update({k2: v for k2, v in member.parameters if k2 != "sigma_n"})
    reasons = []
    if dist > float(est.max_distance):
        reasons.append(f"spectrum unlike every trained family (distance {dist:.1f} > "
                       f"{float(est.max_distance):.1f})")
    if aniso > float(est.max_anisotropy):
        reasons.append(f"anisotropic blur (score {aniso:.2f} > {float(est.max_anisotropy):.2f})")
    return DegradationEstimate(group, params, round(float(prob[k]), 3), not reasons, "slice",
                               "; ".join(reasons) or None, member.family,
                               seconds=time.perf_counter() - t0)


def gains_path(scale: int, weights_dir: Path | None = None) -> Path:
    """Gain table of the in-plane weights groups (``benchmarks/eval_robust.py --validation``)."""
    return Path(weights_dir or WEIGHTS_DIR) / f"selection_slice_x{scale}.json"


def expected_gains(estimate: DegradationEstimate, scale: int,
                   weights_dir: Path | None = None) -> dict[str, float] | None:
    """Expected worst-case PSNR gain (dB over interpolation) of each weights group.

    ``sum_t p(t) * G[g][t]``: the estimate's class probabilities times the worst gain of the
    weights of group ``g`` on data of true group ``t`` over the held-out synthetic validation
    phantoms (``benchmarks/eval_robust.py --validation``).  A wrong, sharpening choice costs
    far more than a mild one gains, so this picks the mild weights (or interpolation) when
    the estimate hesitates.  The worst case (not the mean) was chosen on the validation set,
    leave-one-volume-out: mean +2.17 dB, worst -0.09 dB (mean table: +2.46, worst -4.42).

    Returns
    -------
    dict or None
        Group -> expected gain; None without a table or class probabilities.
    """
    import json

    path = gains_path(scale, weights_dir)
    if not path.is_file():
        path = gains_path(scale)
    if not path.is_file():
        return None
    return expected_gains_from(estimate.parameters, json.loads(path.read_text()))


def expected_gains_from(parameters: dict, table: dict) -> dict[str, float] | None:
    """:func:`expected_gains` from an estimate's parameters and a loaded gain table."""
    probs = {g: parameters.get(f"p_{g}") for g in INPLANE_GROUPS}
    if any(v is None for v in probs.values()):
        return None
    worst = table["min"]
    return {g: round(sum(float(probs[t] or 0.0) * float(worst[g].get(t, 0.0))
                         for t in INPLANE_GROUPS), 3) for g in worst}


def choose_guarded(estimate: dict, table: dict) -> tuple[str, float] | None:
    """The expected-worst-case pick, kept only if its selection cell's worst case agrees.

    The expected worst-case rule (:func:`expected_gains`, a table of sharp validation images)
    trusts the class probabilities; the cell table (``table["guard"]``, the ``by_estimate``
    table of :func:`choose_from_table` over sharp *and* smooth-at-native-resolution validation
    images) knows which images the estimator confuses.  The weights are used only when both
    expect a gain: the pick's worst validation gain among the cases the estimator put in the
    same cell must be positive, over at least :data:`MIN_CELL_CASES` cases.

    Parameters
    ----------
    estimate
        ``DegradationEstimate.as_dict()``.
    table
        Gain table with ``min`` (and ``mean``) and ``guard``.

    Returns
    -------
    tuple or None
        ``(group, trusted gain in dB)``: the smaller of the expected and the cell's worst gain
        (``none`` and -99 when the cell has too few cases); None without class probabilities.
    """
    gains = expected_gains_from(estimate.get("parameters") or {}, table)
    if not gains:
        return None
    best = max(gains, key=lambda g: gains[g])
    guard = table["guard"]
    cell = estimate_cell(estimate, guard.get("confidence_bins", ()))
    if cell is None or int(guard.get("cases", {}).get(cell, 0)) < MIN_CELL_CASES:
        return "none", -99.0
    worst = float(guard.get("by_estimate", {}).get(best, {}).get(cell, -99.0))
    return best, round(min(gains[best], worst), 3)


#: Fewest validation cases a selection cell needs before its worst case is trusted (cells with
#: fewer fall back to interpolation; leave-one-volume-out failures came from such cells).
#: 8 until 2026-12-06; 16 since, decided leave-one-volume-out on the 10-volume slice validation
#: set: with 8 (and 12) the fold without ``val_mr_4`` kept ``kspace_sharp@0.5`` in a 13-case
#: cell that lost 3.22 dB on that volume; 16 is the smallest count with no left-out case below
#: -0.1 dB (x2 family cases +0.39 / +0.86 dB on sharp / smooth images left out, against
#: +0.56 / +0.96 with 8; slice x4 unchanged).
MIN_CELL_CASES = 16


def estimate_cell(estimate: dict, bins: tuple[float, ...] | list[float]) -> str | None:
    """Selection cell ``"<estimated group>|<confidence bin>"`` of an estimate (``as_dict``).

    None when the estimate names no in-plane group or lies outside every family.
    """
    if estimate.get("family") not in INPLANE_GROUPS or not estimate.get("in_family"):
        return None
    confidence = float(estimate.get("confidence", 0.0))
    return f"{estimate['family']}|{sum(confidence >= b for b in bins)}"


def choose_from_table(estimate: dict, table: dict) -> tuple[str, float] | None:
    """Best weights group of an estimate's cell in a ``by_estimate`` table and its worst gain.

    Returns
    -------
    tuple or None
        ``(group, worst validation gain in dB)``; None when the table has no such cell.
    """
    cell = estimate_cell(estimate, table.get("confidence_bins", ()))
    by = table.get("by_estimate") or {}
    if cell is None or not by or not any(cell in row for row in by.values()):
        return None
    if int(table.get("cases", {}).get(cell, MIN_CELL_CASES)) < MIN_CELL_CASES:
        return None  # too few validation cases for a worst case to mean anything
    score = {g: float(row.get(cell, -99.0)) for g, row in by.items()}
    best = max(score, key=lambda g: score[g])
    return best, round(score[best], 3)


#: Interpolations the slice selection tables weigh where they keep no learned weights
#: (:func:`choose_interpolation`): the Lanczos-3 kernel blended half and a quarter of the way
#: from bicubic (``cubic + alpha * (lanczos3 - cubic)``, ``sr_engine.models.split_group``):
#: linear, parameter-free, nothing invented, and less attenuation of the detail below the
#: input's Nyquist frequency than bicubic.  Decided on the validation phantoms (2026-12-06,
#: leave-one-volume-out): full-strength Lanczos-3 lost up to 0.17 dB (smooth images blurred,
#: aliased decimation), and as a candidate it left a x4 case at -0.10 dB; the blends lose at
#: most about 0.06 (x2) / 0.10 (x4) on any validation case, and chosen per cell no left-out
#: case went below -0.07 dB.
INTERPOLATION_CANDIDATES: tuple[str, ...] = ("lanczos3@0.5", "lanczos3@0.25")
#: Smallest worst validation gain of its cell for which an interpolation of
#: :data:`INTERPOLATION_CANDIDATES` replaces bicubic: within half the promise's 0.1 dB (unlike
#: learned weights, whose worst validation case is an optimistic bound, a linear kernel's gain
#: varies little between images; leave-one-volume-out at -0.05: worst -0.07 dB, at -0.03 the
#: same cells).
MIN_KERNEL_WORST_DB = -0.05


def learned_part(table: dict) -> dict:
    """A ``by_estimate`` table without its interpolation keys (the learned weights only)."""
    by = table.get("by_estimate") or {}
    return {**table, "by_estimate": {g: row for g, row in by.items() if not is_interpolation(g)}}


def choose_interpolation(estimate: dict, table: dict) -> tuple[str, float] | None:
    """The interpolation kernel with the best worst gain in an estimate's cell, if safe.

    Parameters
    ----------
    estimate
        ``DegradationEstimate.as_dict()``.
    table
        A ``by_estimate`` table (or a ``guard``), with the kernels of
        :data:`INTERPOLATION_CANDIDATES` among its groups and ``max_noise``, the noisiest
        validation input (:func:`noise_level`): a noisier series gets bicubic, since a kernel
        sharper than bicubic also passes more noise (found with heavy noise, outside every
        family, on the public images: -0.16 dB).  Without ``max_noise``, no noise limit.

    Returns
    -------
    tuple or None
        ``(kernel, worst validation gain in dB over bicubic)`` when that gain is at least
        :data:`MIN_KERNEL_WORST_DB`; else None (bicubic).
    """
    by = table.get("by_estimate") or {}
    kernels = {g: row for g, row in by.items() if g in INTERPOLATION_CANDIDATES}
    if not kernels:
        return None
    limit = table.get("max_noise")
    noise = (estimate.get("parameters") or {}).get("noise")
    if limit is not None and (noise is None or float(noise) > float(limit)):
        return None  # noisier than every validation case: a sharper kernel passes more noise
    pick = choose_from_table(estimate, {**table, "by_estimate": kernels})
    return pick if pick is not None and pick[1] >= MIN_KERNEL_WORST_DB else None


def slice_weights_choice(estimate: DegradationEstimate, scale: int,
                         weights_dir: Path | None = None) -> tuple[str, float, bool] | None:
    """Slice mode: the weights group for an estimate and the gain it can be trusted to keep.

    With a ``by_estimate`` table (``selection_slice_x<N>.json``, built by
    ``benchmarks/eval_robust.py --validation`` on sharp *and* smooth-at-native-resolution
    synthetic phantoms): the weights group with the best *worst* gain over every validation
    case the estimator put in the same cell (estimated group and confidence bin), i.e. minimax
    under the estimator's confusion: "smooth HR + sharp degradation" and "sharp HR + blur" look
    alike, so a cell holding both only gets weights that lose on neither (or interpolation).
    The cell's worst case already covers low confidence.  With a ``guard`` table instead
    (slice x4): the best expected worst-case gain of :func:`expected_gains`, kept only when the
    cell's worst case agrees (:func:`choose_guarded`).  Without either: the best expected
    worst-case gain alone.  The group may name an interpolation of
    :data:`INTERPOLATION_CANDIDATES` instead of weights (``lanczos3@0.5``): with a ``by_estimate``
    table or a ``guard`` table (slice x4) when no learned weights are kept and the kernel's
    cell is safe (:func:`choose_interpolation`).

    Returns
    -------
    tuple or None
        ``(weights group, trusted gain in dB, confidence covered)``: the node uses the group only
        when the gain is above :data:`MIN_CELL_WORST_DB` (``by_estimate`` tables) or
        :data:`MIN_EXPECTED_GAIN_DB` (the other rules; ``nominal``: the nominal weights);
        ``confidence covered`` is True when the table accounts for low confidence itself (else
        the node's confidence threshold applies).  None without a table.
    """
    import json

    path = gains_path(scale, weights_dir)
    if not path.is_file():
        path = gains_path(scale)
    if not path.is_file():
        return None
    table = json.loads(path.read_text())  # read once: every rule below works on it
    if table.get("by_estimate"):
        pick = choose_from_table(estimate.as_dict(), learned_part(table))
        if pick is None or pick[1] <= MIN_CELL_WORST_DB:
            kernel = choose_interpolation(estimate.as_dict(), table)
            if kernel is not None:
                return kernel[0], kernel[1], True
        return (pick[0], pick[1], True) if pick else ("none", -99.0, True)
    if table.get("guard"):
        guarded = choose_guarded(estimate.as_dict(), table)
        if (guarded is not None and guarded[1] > MIN_EXPECTED_GAIN_DB
                and estimate.confidence >= MIN_CONFIDENCE):
            return guarded[0], guarded[1], False
        kernel = choose_interpolation(estimate.as_dict(), table["guard"])
        if kernel is not None:
            return kernel[0], kernel[1], True
        return (guarded[0], guarded[1], False) if guarded else None
    gains = expected_gains_from(estimate.parameters, table)
    if not gains:
        return None
    best = max(gains, key=lambda g: gains[g])
    return best, gains[best], False


def volume_selection_path(scale: int, weights_dir: Path | None = None) -> Path:
    """Gain table of the volume-mode weights (``benchmarks/eval_robust.py --validation``)."""
    return Path(weights_dir or WEIGHTS_DIR) / f"selection_volume_x{scale}.json"


# Share of the probability put on the estimated slab profile family; the rest is spread over all
# families.  The family is right about half the time on the synthetic validation volumes (the
# FWHM much more reliably), so a one-hot belief would over-trust it.
SLAB_FAMILY_TRUST = 0.5


def volume_weights_choice(estimate: DegradationEstimate, scale: int,
                          weights_dir: Path | None = None) -> str | None:
    """Weights (``nominal`` or a profile) with the best expected worst-case validation gain.

    Returns
    -------
    str or None
        ``nominal``, ``box``, ``gaussian`` or ``sinc``; None without a table (then the estimated
        profile's weights are used).
    """
    import json

    path = volume_selection_path(scale, weights_dir)
    if not path.is_file():
        path = volume_selection_path(scale)
    if not path.is_file() or estimate.family not in SLAB_PROFILES:
        return None
    table = json.loads(path.read_text())["min"]
    rest = (1.0 - SLAB_FAMILY_TRUST) / len(SLAB_PROFILES)
    prob = {t: rest + (SLAB_FAMILY_TRUST if t == estimate.family else 0.0) for t in SLAB_PROFILES}
    score = {w: sum(prob[t] * float(row.get(t, 0.0)) for t in SLAB_PROFILES)
             for w, row in table.items()}
    return max(score, key=lambda w: score[w])


def operator_of(estimate: DegradationEstimate) -> Degradation | None:
    """The degradation operator an estimate stands for (None when unknown)."""
    p = estimate.parameters
    if estimate.mode == "slice":
        if estimate.family not in INPLANE_GROUPS:
            return None
        return _group_member(estimate.family, p.get("sigma_n", 0.3))
    if estimate.family not in SLAB_PROFILES:
        return None
    return Degradation.of(estimate.family, fwhm=p.get("fwhm", 1.0))


# How the adaptation picks its training degradations from a volume estimate (see
# :func:`adaptation_profiles`); decided on the synthetic validation volumes
# (``benchmarks/eval_adapt.py``).
ADAPT_POLICY = "posterior"
# Misfit scale (temperature) of the ``posterior`` policy: a family whose best member misfits by
# this much more than the best family gets e**-1 of its share.  Calibrated on the synthetic
# validation volumes (``benchmarks/slab_calibration.py``): the likelihood of the true family
# peaks at 0.15 (mean log p -0.98; 0.01, the earlier value, was overconfident at -3.39, since the
# best-fitting family is right in only 46 % of the cases).  Adaptation with it, same volumes
# (``eval_adapt --count 1 --profiles all --steps 6000``): mean +5.35 dB, worst +3.05 (0.01:
# +5.34, worst +1.88; every family in turn: +5.14, worst +3.05).
ADAPT_POSTERIOR_SCALE = 0.15
ADAPT_POLICIES = ("estimated", "families", "posterior", "top2", "posterior-nominal",
                  "nominal")


def family_posterior(misfits: Sequence[float], temperature: float | None = None) -> list[float]:
    """Probabilities of slab families from their best misfits: ``exp(-(m - min) / T)``, normalised.

    ``temperature`` None: :data:`ADAPT_POSTERIOR_SCALE` (calibrated on the validation volumes).
    """
    t = ADAPT_POSTERIOR_SCALE if temperature is None else temperature
    low = min(misfits)
    weights = [math.exp(-(m - low) / t) for m in misfits]
    return [w / sum(weights) for w in weights]


def adaptation_profiles(estimate: DegradationEstimate | None, nominal_fwhm: float,
                        policy: str | None = None, posterior_scale: float | None = None
                        ) -> list[Degradation]:
    """Slab profiles the per-series adaptation makes its training pairs with (volume mode).

    Parameters
    ----------
    estimate
        The series' volume estimate (None, or outside every family: the header's box slab).
    nominal_fwhm
        Slice thickness over spacing from the header (the fallback box profile's FWHM).
    policy
        ``estimated``: the estimated family and FWHM only; ``families``: every family's
        best-fitting member in turn; ``posterior``: the same, each family as often as
        ``exp(-(misfit - best misfit) / ADAPT_POSTERIOR_SCALE)`` says (out of 12 turns);
        ``top2``: the two best families' members; ``posterior-nominal``: the ``posterior``
        turns, each followed by the same family at the header's FWHM (the data picks the
        family, data and header share the width); ``nominal``: the ``posterior`` families at
        the header's FWHM only.  None: :data:`ADAPT_POLICY`.
    posterior_scale
        Misfit scale (temperature) of the ``posterior`` turns; None:
        :data:`ADAPT_POSTERIOR_SCALE`.

    Returns
    -------
    list of Degradation
        One or more profiles; :func:`sr_engine.training.adapt_on_series` takes them in turn.
    """
    policy = policy or ADAPT_POLICY
    if policy not in ADAPT_POLICIES:
        raise ValueError(f"unknown adaptation policy {policy!r} (expected one of "
                         f"{', '.join(ADAPT_POLICIES)})")
    if estimate is None or not estimate.in_family or estimate.family not in SLAB_PROFILES:
        return [Degradation.of("box", fwhm=nominal_fwhm if nominal_fwhm > 0 else 1.0)]
    p = estimate.parameters
    best = operator_of(estimate)
    assert best is not None
    members = {f: (float(p[f"misfit_{f}"]), Degradation.of(f, fwhm=float(p[f"fwhm_{f}"])))
               for f in SLAB_PROFILES if f"misfit_{f}" in p and f"fwhm_{f}" in p}
    if policy == "estimated" or len(members) < 2:
        return [best]
    ranked = sorted(members.values(), key=lambda m: m[0])
    if policy == "families":
        return [d for _, d in ranked]
    if policy == "top2":
        return [d for _, d in ranked[:2]]
    weights = family_posterior([m for m, _ in ranked], posterior_scale)
    turns = [max(0, round(12 * w)) for w in weights]
    out: list[Degradation] = []
    while any(turns):  # interleave, so that every family is met early in a short budget
        for i, (_, d) in enumerate(ranked):
            if turns[i]:
                out.append(d)
                turns[i] -= 1
    out = out or [best]
    if policy in ("posterior-nominal", "nominal") and nominal_fwhm > 0:
        at_nominal = [Degradation.of(d.family, fwhm=float(nominal_fwhm)) for d in out]
        if policy == "nominal":
            return at_nominal
        return [d for pair in zip(out, at_nominal, strict=True) for d in pair]
    return out


# --- through-plane ------------------------------------------------------------------------

def _band_log_power(lines: np.ndarray, bands: int) -> np.ndarray:
    """Log mean power in ``bands`` equal bands of [0, 0.5] of 1-D lines ``(L, n)``."""
    n = lines.shape[1]
    x = lines - lines.mean(axis=1, keepdims=True)
    p = np.abs(np.fft.rfft(x * np.hanning(n)[None], axis=1)) ** 2
    f = np.fft.rfftfreq(n)
    b = np.minimum((f / 0.5 * bands).astype(int), bands - 1)
    sums = np.bincount(b, weights=p.mean(axis=0), minlength=bands)
    counts = np.bincount(b, minlength=bands)
    return np.log(sums / np.maximum(counts, 1) + 1e-12)


def _shape(curve: np.ndarray) -> np.ndarray:
    return curve - curve[1:3].mean()


def slab_lines(volume: np.ndarray, scale: int, bands: int, max_lines: int = 2048,
               seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The z spectrum of a thick series and its in-plane reference lines (:func:`estimate_slab`).

    Parameters
    ----------
    volume
        ``(z, y, x)`` in network units, z the thick-slice axis.
    scale
        Slice spacing over the in-plane pixel size.
    bands
        Frequency bands of the z spectrum.
    max_lines
        Lines sampled along z (and half as many along each in-plane axis).
    seed
        Sampling seed (deterministic).

    Returns
    -------
    tuple
        The shape-normalised log band power along z, and the in-plane lines along y and along
        x, ``nz * scale`` fine samples each (at most the in-plane size).
    """
    nz, ny, nx = volume.shape
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, ny * nx, size=min(max_lines, ny * nx))
    zlines = volume.reshape(nz, -1)[:, cols].T.astype(np.float64)
    target = _shape(_band_log_power(zlines, bands))
    seg = min(nz * scale, ny, nx)
    seg -= seg % scale
    refs = []
    for axis in (1, 2):
        planes = np.moveaxis(volume, axis, 2)  # (.., .., along)
        a, b, n = planes.shape
        count = min(max_lines // 2, a * b)
        ia, ib = rng.integers(0, a, count), rng.integers(0, b, count)
        start = rng.integers(0, n - seg + 1, count)
        idx = start[:, None] + np.arange(seg)[None]
        refs.append(planes[ia[:, None], ib[:, None], idx])
    return target, refs


def slab_candidate_curve(lines: np.ndarray, scale: int, profile: str, fwhm: float,
                         bands: int) -> np.ndarray:
    """Shape-normalised log band power of fine lines ``(L, n)`` degraded by a slab profile."""
    ref = torch.from_numpy(lines.astype(np.float32))[:, None, :, None]
    with torch.inference_mode():
        lr = _decimate_axis(ref.transpose(2, 3), slab_taps(scale, profile, fwhm), scale,
                            3)[:, 0, 0].numpy()
    return _shape(_band_log_power(lr.astype(np.float64), bands))


def estimate_slab(volume: np.ndarray, scale: int, thickness_ratio: float | None = None,
                  max_lines: int = 2048, seed: int = 0) -> DegradationEstimate:
    """Estimate the through-plane slab profile of a thick-slice series (volume mode).

    Parameters
    ----------
    volume
        ``(z, y, x)`` in network units; z is the thick-slice axis, y and x are the fine
        in-plane axes (taken as the high-resolution reference).
    scale
        Slice spacing over the in-plane pixel size (the requested factor).
    thickness_ratio
        Nominal slice thickness over the slice spacing from the header (reported; the estimate
        itself comes from the data).
    max_lines
        Lines sampled along each axis.
    seed
        Sampling seed (deterministic).

    Returns
    -------
    DegradationEstimate
        Family ``box``/``gaussian``/``sinc``, ``fwhm`` in units of the slice spacing,
        confidence from the misfit gap to the best other profile family, ``in_family`` False
        when even the best candidate misfits.
    """
    t0 = time.perf_counter()
    nz, ny, nx = volume.shape
    bands = int(min(SLAB_BANDS, max(3, nz // 4)))
    if nz < 8 or ny < 8 * scale:
        return DegradationEstimate("unknown", {}, 0.0, False, "volume",
                                   "too few slices or too small in-plane for the estimate",
                                   seconds=time.perf_counter() - t0)
    target, refs = slab_lines(volume, scale, bands, max_lines, seed)
    ref = np.concatenate(refs)
    fits: list[tuple[float, str, float]] = []
    for profile in SLAB_PROFILES:
        for fwhm in FWHM_GRID:
            cand = slab_candidate_curve(ref, scale, profile, fwhm, bands)
            misfit = float(np.mean((cand[2:] - target[2:]) ** 2))
            fits.append((misfit, profile, fwhm))
    fits.sort()
    best, profile, fwhm = fits[0]
    other = min(m for m, p, _ in fits if p != profile)
    # Confidence: how well the best candidate explains the z spectrum (profiles of similar
    # blur are hard to tell apart and lead to similar weights; ``margin`` reports the gap).
    confidence = float(math.exp(-best / SLAB_MISFIT_SCALE))
    params = {"fwhm": float(fwhm), "misfit": round(best, 4), "margin": round(other - best, 4)}
    for family in SLAB_PROFILES:  # every family's best member: the adaptation hedges over them
        m, _, w = min(f for f in fits if f[1] == family)
        params[f"fwhm_{family}"], params[f"misfit_{family}"] = float(w), round(m, 4)
    if thickness_ratio is not None:
        params["nominal_fwhm"] = round(float(thickness_ratio), 3)
    inside = best <= SLAB_MAX_MISFIT
    reason = None if inside else (f"z spectrum unlike every slab profile (misfit {best:.2f} > "
                                  f"{SLAB_MAX_MISFIT})")
    return DegradationEstimate(profile, params, round(confidence, 3), inside, "volume", reason,
                               profile, seconds=time.perf_counter() - t0)


# --- training of the in-plane estimator ----------------------------------------------------

def augment_hr(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make a training HR image look like a real reconstruction (before the degradation).

    Real HR images are not ideal: scanner blur, MR matrices zero-filled to a larger size
    (spectrum empty beyond a cut-off), CT/MR noise.  Drawn so that the estimator cannot take
    scene properties for the operator and becomes uncertain where the two are ambiguous.
    """
    from scipy import ndimage

    u = rng.random()
    out = np.asarray(hr, dtype=np.float32)
    if u < 0.35:
        out = ndimage.gaussian_filter(out, rng.uniform(0.3, 1.2))
    elif u < 0.6:
        cut = rng.uniform(0.4, 0.9) * 0.5
        spec = np.fft.fft2(out)
        fy = np.abs(np.fft.fftfreq(out.shape[0]))[:, None]
        fx = np.abs(np.fft.fftfreq(out.shape[1]))[None, :]
        out = np.fft.ifft2(spec * ((fy <= cut) & (fx <= cut))).real.astype(np.float32)
    if rng.random() < 0.25:
        out = out + rng.uniform(0.002, 0.02) * rng.standard_normal(out.shape).astype(np.float32)
    return out


def training_features(scale: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """Features, group labels and ``sigma_n`` of random family members of training images.

    Images: :func:`sr_engine.data.training_pool` (scikit-image natural images and phantoms),
    random crops, optional HR pre-blur; degradations from :func:`sample_inplane` (held-out
    bands excluded).
    """
    from .data import training_pool

    pool = [p for p in training_pool(seed, phantoms=24) if min(p.shape) >= 64 * scale]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    feats, labels, sig = [], [], []
    while len(feats) < samples:
        img = pool[int(rng.integers(len(pool)))]
        edge = int(rng.integers(48, 129)) * scale
        edge = min(edge, (min(img.shape) // scale) * scale)
        y0 = int(rng.integers(0, img.shape[0] - edge + 1))
        x0 = int(rng.integers(0, img.shape[1] - edge + 1))
        hr = augment_hr(img[y0:y0 + edge, x0:x0 + edge], rng)
        deg = sample_inplane(rng.random(5).tolist())
        with torch.inference_mode():
            lr = apply_inplane(torch.from_numpy(np.ascontiguousarray(hr))[None, None], scale,
                               deg, gen)[0, 0].numpy()
        f = spectral_features(lr)
        if f is None:
            continue
        feats.append(f)
        labels.append(INPLANE_GROUPS.index(inplane_group(deg)))
        sig.append(deg.get("sigma_n") if deg.family == "area" else -1.0)
    return np.stack(feats), np.asarray(labels), np.asarray(sig, dtype=np.float32)


def train_estimator(scale: int, samples: int = 6000, seed: int = 11, epochs: int = 300,
                    out_dir: Path | None = None) -> dict[str, float]:
    """Train and save the in-plane estimator for ``scale``.

    Parameters
    ----------
    scale
        In-plane factor.
    samples
        Training samples (random images x family members).
    seed
        Seed of images, degradations and initialisation.
    epochs
        Full-batch Adam epochs.
    out_dir
        Destination folder (default: shipped weights).

    Returns
    -------
    dict
        Training and held-back accuracy of the group classifier, thresholds.
    """
    torch.manual_seed(seed)
    x, y, s = training_features(scale, samples, seed)
    split = int(0.85 * len(x))
    est = InplaneEstimator()
    xt = torch.from_numpy(x)
    mean, std = xt[:split].mean(0), xt[:split].std(0) + 1e-3
    est.mean.copy_(mean)
    est.std.copy_(std)
    z = (xt[:split] - mean) / std
    cov = torch.cov(z.T) + 0.05 * torch.eye(z.shape[1])
    est.precision.copy_(torch.linalg.inv(cov))
    yt, st = torch.from_numpy(y), torch.from_numpy(s)
    opt = torch.optim.Adam(est.net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        out = est(xt[:split])
        loss = torch.nn.functional.cross_entropy(out[:, :-1], yt[:split])
        area = st[:split] >= 0
        loss = loss + 10 * torch.mean((out[area, -1] - st[:split][area]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        d = est.distance(xt[:split])
        est.max_distance.fill_(float(torch.quantile(d, 0.999)) * 1.25)
        an = torch.tensor([anisotropy(f) for f in x[:split]])
        est.max_anisotropy.fill_(float(torch.quantile(an, 0.999)) * 1.25)
        acc_train = float((est(xt[:split])[:, :-1].argmax(1) == yt[:split]).float().mean())
        acc_val = float((est(xt[split:])[:, :-1].argmax(1) == yt[split:]).float().mean())
    path = estimator_path(scale, out_dir)
    meta = {"scale": str(scale), "samples": str(samples), "seed": str(seed),
            "data": "skimage natural images + synthetic CT/MR phantoms (sr_engine.data)",
            "groups": ",".join(INPLANE_GROUPS)}
    save_file({k: v.contiguous() for k, v in est.state_dict().items()}, str(path), metadata=meta)
    _ESTIMATORS.pop(str(path), None)
    return {"accuracy_train": round(acc_train, 4), "accuracy_heldback": round(acc_val, 4),
            "max_distance": round(float(est.max_distance), 2),
            "max_anisotropy": round(float(est.max_anisotropy), 4)}


def main(argv: list[str] | None = None) -> int:
    """``python -m sr_engine.estimate --scale 2 [--samples 6000]``: train the estimator."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--scale", type=int, required=True)
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(train_estimator(args.scale, args.samples, args.seed, out_dir=args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
