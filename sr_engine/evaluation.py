"""Evaluation of a model against a baseline on HR volumes degraded with the nominal operator.

Documented degradation (what makes the LR input from a HR case):

* ``slice`` mode x``N``: :func:`sr_engine.degrade.degrade_inplane` with its nominal PSF
  (box of ``N`` pixels convolved with a Gaussian of ``sigma = 0.3 N`` HR pixels), no added noise;
  H and W are cropped to multiples of ``N`` first.
* ``volume`` mode x``r``: thick slabs = mean of ``r`` consecutive HR slices (box profile,
  contiguous, no gap); z is cropped to a multiple of ``r``.

Metrics are computed on intensities normalised as: CT clipped to [-1024, 3071] HU then / 4095;
MR (and others) / the 99.5th percentile of the HR case.  PSNR uses a data range of 1; SSIM is
``skimage.metrics.structural_similarity`` (``data_range=1``), averaged over axial slices in slice
mode and computed in 3-D in volume mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from .api import EnhanceRequest, EnhanceResult
from .degrade import degrade_inplane
from .inference import enhance_volume

Case = tuple[str, np.ndarray, tuple[float, float, float], str]


def crop_for_scale(volume: np.ndarray, spacing: tuple[float, float, float], mode: str,
                   scale: int) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """The HR case cropped to a multiple of ``scale`` and the LR geometry it degrades to.

    Returns
    -------
    tuple
        ``(cropped HR (z, y, x) float32, LR spacing, LR slice thickness)``: in slice mode y and
        x are cropped and the in-plane spacing grows by ``scale``; in volume mode z is cropped
        and the slices become ``scale`` times thicker (contiguous).
    """
    dz, dy, dx = (float(v) for v in spacing)
    vol = np.asarray(volume, dtype=np.float32)
    if mode == "slice":
        h, w = (vol.shape[1] // scale) * scale, (vol.shape[2] // scale) * scale
        return vol[:, :h, :w], (dz, dy * scale, dx * scale), dz
    z = (vol.shape[0] // scale) * scale
    return vol[:z], (dz * scale, dy, dx), dz * scale


def make_lr(volume: np.ndarray, spacing: tuple[float, float, float], mode: str,
            scale: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], float]:
    """Apply the documented degradation.

    Parameters
    ----------
    volume
        HR volume ``(z, y, x)`` in modality units.
    spacing
        HR spacing ``(dz, dy, dx)`` mm.
    mode, scale
        Task.

    Returns
    -------
    tuple
        ``(cropped HR, LR volume, LR spacing, LR slice thickness)``.
    """
    hr, lr_spacing, thickness = crop_for_scale(volume, spacing, mode, scale)
    if mode == "slice":
        with torch.inference_mode():
            lr = degrade_inplane(torch.from_numpy(np.ascontiguousarray(hr)).unsqueeze(1), scale)
        return hr, lr.squeeze(1).numpy(), lr_spacing, thickness
    z = hr.shape[0]
    lr = hr.reshape(z // scale, scale, *hr.shape[1:]).mean(axis=1, dtype=np.float64)
    return hr, lr.astype(np.float32), lr_spacing, thickness


def _enhance_cropped(lr: np.ndarray, lr_spacing: tuple[float, float, float], thickness: float,
                     modality: str, request: EnhanceRequest, shape: tuple[int, ...],
                     weights_dir: Path | None) -> tuple[np.ndarray, EnhanceResult]:
    """Enhance ``lr`` and crop the output to the HR case's ``shape``."""
    res = enhance_volume(lr, lr_spacing, thickness, modality, request, weights_dir=weights_dir)
    return res.volume[: shape[0], : shape[1], : shape[2]], res


def normalise_for_metrics(values: np.ndarray, reference: np.ndarray, modality: str) -> np.ndarray:
    """Metric normalisation: CT clip [-1024, 3071] / 4095 (offset -1024); else / p99.5(ref)."""
    if modality.upper() == "CT":
        return (np.clip(values, -1024.0, 3071.0) + 1024.0) / 4095.0
    p = float(np.percentile(reference, 99.5))
    return values / (p if p > 0 else 1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for data range 1."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(a: np.ndarray, b: np.ndarray, mode: str) -> float:
    """SSIM (data range 1): mean over axial slices (slice mode) or 3-D (volume mode)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if mode == "volume" and min(a.shape) >= 7:
        return float(structural_similarity(a, b, data_range=1.0))
    win = min(7, *(s if s % 2 else s - 1 for s in a.shape[1:]))
    return float(np.mean([structural_similarity(x, y, data_range=1.0, win_size=win)
                          for x, y in zip(a, b, strict=True)]))


def evaluate_volumes(cases: list[Case], mode: str, scale: int, model: str,
                     baseline: str | None = None, *, weights_dir: Path | None = None,
                     device: str = "cpu", self_ensemble: bool | None = None) -> dict:
    """Compare a model with a baseline on HR cases.

    Parameters
    ----------
    cases
        ``(name, HR volume (z, y, x) in modality units, spacing (dz, dy, dx) mm, modality)``.
    mode, scale
        Task.
    model
        Model under test.
    baseline
        Reference model (default ``bicubic`` in slice mode, ``cubic`` in volume mode).
    weights_dir
        Optional weights folder.
    device
        Inference device.
    self_ensemble
        Geometric self-ensemble of the model (``None``: the mode's default, as in
        :class:`~sr_engine.api.EnhanceRequest`); interpolation baselines never need it.

    Returns
    -------
    dict
        ``{"cases": [{"name", "psnr", "psnr_baseline", "ssim", "ssim_baseline",
        "seconds_per_slice", "model_used", "choice", "estimated_degradation"}],
        "mean_psnr_gain_db", "mean_ssim_gain", ...}``; ``seconds_per_slice`` is the model's
        wall time per output slice; ``model_used``/``choice`` say what the engine actually ran
        (for ``auto``: the weights chosen from the estimate, or the interpolation fallback).
    """
    baseline = baseline or ("bicubic" if mode == "slice" else "cubic")
    rows = []
    used_ensemble = False
    for name, volume, spacing, modality in cases:
        hr, lr, lr_spacing, thickness = make_lr(volume, spacing, mode, scale)
        scores = {}
        for tag, m in (("model", model), ("baseline", baseline)):
            req = EnhanceRequest(mode=mode, scale=scale, model=m, device=device,  # type: ignore[arg-type]
                                 self_ensemble=self_ensemble)
            sr, res = _enhance_cropped(lr, lr_spacing, thickness, modality, req, hr.shape,
                                       weights_dir)
            ref = normalise_for_metrics(hr, hr, modality)
            out = normalise_for_metrics(sr, hr, modality)
            scores[tag] = (psnr(out, ref), ssim(out, ref, mode), res.seconds / sr.shape[0])
            if tag == "model":
                used_ensemble = bool(res.extra.get("self_ensemble", False))
                choice = {"model_used": res.model_name, "choice": res.describe(),
                          "estimated_degradation": (res.degradation.as_dict()
                                                    if res.degradation is not None else None)}
        rows.append({"name": name, "modality": modality, "shape": list(hr.shape),
                     "psnr": round(scores["model"][0], 3),
                     "psnr_baseline": round(scores["baseline"][0], 3),
                     "ssim": round(scores["model"][1], 4),
                     "ssim_baseline": round(scores["baseline"][1], 4),
                     "seconds_per_slice": round(scores["model"][2], 5), **choice})
    gains = [r["psnr"] - r["psnr_baseline"] for r in rows]
    sgains = [r["ssim"] - r["ssim_baseline"] for r in rows]
    return {"mode": mode, "scale": scale, "model": model, "baseline": baseline,
            "self_ensemble": used_ensemble if rows else None, "cases": rows,
            "mean_psnr_gain_db": round(float(np.mean(gains)), 3) if rows else 0.0,
            "mean_ssim_gain": round(float(np.mean(sgains)), 4) if rows else 0.0}


#: Gain below which a case breaks the promise (dB under the interpolation baseline).
PROMISE_TOLERANCE_DB = 0.1
DEGRADATION_SETS = ("nominal", "families", "all")


def degradation_catalogue(mode: str, which: str = "all") -> list[tuple[str, object, str]]:
    """The degradations of a robustness evaluation: ``(label, operator, kind)``.

    Parameters
    ----------
    mode
        ``slice`` (in-plane operators) or ``volume`` (slab profiles).
    which
        ``families``: every trained family at typical parameters and the held-out parameter
        bands (:data:`sr_engine.degrade.BENCHMARK_INPLANE` / ``BENCHMARK_SLAB``); ``all``: also
        the operators outside every family (:mod:`sr_engine.stress`).

    Returns
    -------
    list of tuple
        ``kind`` is ``family``, ``held-out`` or ``outside`` (``outside, validation stress`` for
        the two kinds the selection tables are built on).
    """
    from .degrade import BENCHMARK_INPLANE, BENCHMARK_SLAB
    from .stress import GUARDED_ON_VALIDATION, INPLANE_UNSEEN, SLAB_UNSEEN

    if which not in ("families", "all"):
        raise ValueError(f"unknown degradation set {which!r} (families or all)")
    families = BENCHMARK_INPLANE if mode == "slice" else BENCHMARK_SLAB
    out: list[tuple[str, object, str]] = [
        (label, deg, "held-out" if held else "family") for label, deg, held in families]
    if which == "all":
        outside = INPLANE_UNSEEN if mode == "slice" else SLAB_UNSEEN
        out += [(label, op, "outside, validation stress" if label in GUARDED_ON_VALIDATION
                 else "outside") for label, op in outside]
    return out


def evaluate_robustness(cases: list[Case], mode: str, scale: int, model: str = "auto",
                        which: str = "all", *, weights_dir: Path | None = None,
                        device: str = "cpu", self_ensemble: bool | None = None,
                        max_slices: int = 16, adapt_seconds: float = 0.0) -> dict:
    """The node's promise on a site's own images: every degradation, model against baseline.

    Each HR case is degraded by every operator of :func:`degradation_catalogue` (in-plane in
    slice mode, along z in volume mode), enhanced by ``model`` (default ``auto``: the node's
    choice with the degradation estimate) and by the interpolation baseline, and scored
    against the HR case.  A case breaks the promise when the model is worse than the baseline
    by more than :data:`PROMISE_TOLERANCE_DB`.

    Parameters
    ----------
    cases
        ``(name, HR volume (z, y, x) in modality units, spacing (dz, dy, dx) mm, modality)``.
    mode, scale
        Task.
    model
        Model under test (``auto``: as the node chooses).
    which
        ``families`` or ``all`` (see :func:`degradation_catalogue`).
    weights_dir, device, self_ensemble
        As for :func:`evaluate_volumes`.
    max_slices
        Slice mode: at most this many evenly spaced slices per case (0: all), to keep the
        evaluation short; volume mode uses the whole volume.
    adapt_seconds
        Volume mode: per-series adaptation of the model, as the node runs it
        (``[engine] adapt_seconds``); 0 (default) evaluates the shipped weights alone.

    Returns
    -------
    dict
        ``{"rows": [{"name", "degradation", "kind", "psnr", "psnr_baseline", "gain", "choice",
        "fallback"}], "by_degradation": {label: {"kind", "cases", "mean_gain", "worst_gain",
        "below", "fallbacks"}}, "cases", "below", "worst_gain", "promise_kept", ...}``.
    """
    from .stream import estimate_picks
    from .stress import degrade_series

    baseline = "bicubic" if mode == "slice" else "cubic"
    catalogue = degradation_catalogue(mode, which)
    rows = []
    for name, volume, spacing, modality in cases:
        if mode == "slice" and max_slices > 0:
            volume = np.asarray(volume)[estimate_picks(len(volume), max_slices)]
        hr, lr_spacing, thickness = crop_for_scale(volume, spacing, mode, scale)
        hr = np.ascontiguousarray(hr)
        if hr.size == 0 or (mode == "volume" and hr.shape[0] < 2):
            continue  # too small for this scale
        ref = normalise_for_metrics(hr, hr, modality)
        for label, op, kind in catalogue:
            lr = degrade_series(hr, modality, op, scale, axis_last=mode == "volume")  # type: ignore[arg-type]
            scores, choice, fallback = {}, "", False
            for tag, m in (("model", model), ("baseline", baseline)):
                req = EnhanceRequest(mode=mode, scale=scale, model=m, device=device,  # type: ignore[arg-type]
                                     self_ensemble=self_ensemble,
                                     adapt_seconds=adapt_seconds if tag == "model" else 0.0)
                out, res = _enhance_cropped(lr, lr_spacing, thickness, modality, req, hr.shape,
                                            weights_dir)
                scores[tag] = psnr(normalise_for_metrics(out, hr, modality), ref)
                if tag == "model":
                    choice, fallback = res.describe(), res.fallback_reason is not None
            rows.append({"name": name, "degradation": label, "kind": kind,
                         "psnr": round(scores["model"], 3),
                         "psnr_baseline": round(scores["baseline"], 3),
                         "gain": round(scores["model"] - scores["baseline"], 3),
                         "choice": choice, "fallback": fallback})
    by: dict[str, dict[str, object]] = {}
    for label, _, kind in catalogue:
        gains = [r["gain"] for r in rows if r["degradation"] == label]
        if not gains:
            continue
        by[label] = {"kind": kind, "cases": len(gains),
                     "mean_gain": round(float(np.mean(gains)), 3),
                     "worst_gain": round(float(min(gains)), 3),
                     "below": sum(g < -PROMISE_TOLERANCE_DB for g in gains),
                     "fallbacks": sum(bool(r["fallback"]) for r in rows
                                      if r["degradation"] == label)}
    if not rows:
        raise ValueError(f"no image large enough for {mode} x{scale}")
    gains = [r["gain"] for r in rows]
    below = sum(g < -PROMISE_TOLERANCE_DB for g in gains)
    return {"mode": mode, "scale": scale, "model": model, "baseline": baseline,
            "degradations": which, "rows": rows, "by_degradation": by, "cases": len(rows),
            "below": below, "worst_gain": round(float(min(gains)), 3) if gains else 0.0,
            "mean_gain": round(float(np.mean(gains)), 3) if gains else 0.0,
            "promise_kept": below == 0, "tolerance_db": PROMISE_TOLERANCE_DB}
