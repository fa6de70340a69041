"""Run the engine on one volume and score it against its truth (shared by the SR benchmarks).

Imports the SR engine only (no DICOM packages), so that the adaptation sweep also runs on a
GPU machine that has torch but not the node's DICOM stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

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


def run_adapted_keeps(lr: np.ndarray, spacing: tuple[float, float, float], thickness: float,
                      modality: str, request: EnhanceRequest, hr: np.ndarray,
                      keeps: Sequence[float]) -> tuple[dict[float, float], dict]:
    """Adapt once, then score several shares of the fine-tune kept (no training again).

    The first run adapts with ``keep`` 1 (whatever :func:`sr_engine.training.adapt_on_series`
    is installed, e.g. a benchmark variant); each later run loads
    ``shipped + keep * (adapted - shipped)`` instead of training, which is what
    ``adapt_on_series(keep=...)`` returns after the same steps.

    Returns
    -------
    tuple
        ({keep: PSNR}, the first run's adaptation record).
    """
    from sr_engine import training

    installed = training.adapt_on_series
    stash: dict = {}

    def train_then(keep: float) -> Callable[..., dict]:
        def adapt(net: torch.nn.Module, *a: object, **kw: object) -> dict:
            stash["init"] = [p.detach().clone() for p in net.parameters()]
            stash["info"] = installed(net, *a, **{**kw, "keep": 1.0})
            stash["adapted"] = [p.detach().clone() for p in net.parameters()]
            return replay(keep)(net, device=str(kw.get("device", "cpu")))
        return adapt

    def replay(keep: float) -> Callable[..., dict]:
        def load(net: torch.nn.Module, *_a: object, device: str = "cpu", **_kw: object) -> dict:
            net.to(device)
            with torch.no_grad():
                for p, s0, s1 in zip(net.parameters(), stash["init"], stash["adapted"],
                                     strict=True):
                    p.copy_((s0 + keep * (s1 - s0)).to(p.device))
            net.eval()
            return {**stash["info"], "keep": keep}
        return load

    scores: dict[float, float] = {}
    try:
        for i, keep in enumerate(sorted(keeps, reverse=True)):
            training.adapt_on_series = train_then(keep) if i == 0 else replay(keep)  # type: ignore[assignment]
            scores[keep], _ = run_volume(lr, spacing, thickness, modality, request, hr)
    finally:
        training.adapt_on_series = installed  # type: ignore[assignment]
    return scores, stash.get("info", {})
