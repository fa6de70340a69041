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

from .api import EnhanceRequest
from .degrade import degrade_inplane
from .inference import enhance_volume

Case = tuple[str, np.ndarray, tuple[float, float, float], str]


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
    dz, dy, dx = spacing
    vol = np.asarray(volume, dtype=np.float32)
    if mode == "slice":
        h, w = (vol.shape[1] // scale) * scale, (vol.shape[2] // scale) * scale
        hr = vol[:, :h, :w]
        with torch.inference_mode():
            lr = degrade_inplane(torch.from_numpy(np.ascontiguousarray(hr)).unsqueeze(1), scale)
        return hr, lr.squeeze(1).numpy(), (dz, dy * scale, dx * scale), dz
    z = (vol.shape[0] // scale) * scale
    hr = vol[:z]
    lr = hr.reshape(z // scale, scale, *hr.shape[1:]).mean(axis=1, dtype=np.float64)
    return hr, lr.astype(np.float32), (dz * scale, dy, dx), dz * scale


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
            res = enhance_volume(lr, lr_spacing, thickness, modality, req, weights_dir=weights_dir)
            sr = res.volume[:, : hr.shape[1], : hr.shape[2]]
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
