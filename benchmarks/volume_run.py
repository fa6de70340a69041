"""Run the engine on one volume and score it against its truth (shared by the SR benchmarks).

Imports the SR engine only (no DICOM packages), so that the adaptation sweep also runs on a
GPU machine that has torch but not the node's DICOM stack.
"""

from __future__ import annotations

import numpy as np

from sr_engine import EnhanceRequest, enhance_volume
from sr_engine.evaluation import normalise_for_metrics, psnr


def score_volume(out: np.ndarray, hr: np.ndarray, modality: str) -> float:
    """PSNR (dB) of ``out`` cropped to ``hr``, both normalised as the public benchmark does."""
    out = out[: hr.shape[0], : hr.shape[1], : hr.shape[2]]
    return round(psnr(normalise_for_metrics(out, hr, modality),
                      normalise_for_metrics(hr, hr, modality)), 3)


def run_volume(lr: np.ndarray, spacing: tuple[float, float, float], thickness: float,
               modality: str, request: EnhanceRequest, hr: np.ndarray) -> tuple[float, object]:
    """Enhance ``lr`` with ``request``; returns (PSNR against ``hr``, the EnhanceResult)."""
    res = enhance_volume(lr, spacing, thickness, modality, request)
    return score_volume(res.volume, hr, modality), res
