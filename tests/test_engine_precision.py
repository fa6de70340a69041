"""The mixed-precision (CUDA) path of the engine, exercised on a machine without a GPU.

On CUDA the engine runs the network under float16 autocast (``precision="auto"``).  The CPU
stand-in runs the same code path under bfloat16 autocast (``precision="mixed"``): the network
really computes in reduced precision (checked on its layer outputs), the blended output is
float32, and the quality stays that of the float32 path.  The CUDA out-of-memory fallback is
driven through the engine's own retry with a device that fails the way a full GPU does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.weights_guard import guard_cases
from sr_engine import inference
from sr_engine.api import EnhanceRequest, uses_mixed_precision
from sr_engine.errors import UnsupportedRequestError
from sr_engine.evaluation import make_lr, normalise_for_metrics, psnr
from sr_engine.models import load_model
from sr_engine.tiling import AMP_DTYPE, amp_context, upsample_planes


def _case() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    name, volume, spacing, modality = guard_cases()[0]
    hr, lr, lr_spacing, _ = make_lr(volume[:4], spacing, "slice", 2)
    return hr, lr, lr_spacing, modality


def _enhance(lr: np.ndarray, spacing: tuple[float, float, float], modality: str,
             **request: object) -> inference.EnhanceResult:
    req = EnhanceRequest(mode="slice", scale=2, model="fast", device="cpu",
                         estimate_degradation=False, **request)  # type: ignore[arg-type]
    return inference.enhance_volume(lr, spacing, spacing[0], modality, req)


def test_precision_policy() -> None:
    assert uses_mixed_precision("auto", "cuda") and not uses_mixed_precision("auto", "cpu")
    assert uses_mixed_precision("mixed", "cpu") and not uses_mixed_precision("float32", "cuda")
    assert AMP_DTYPE["cuda"] == torch.float16


def test_autocast_really_lowers_the_network_precision() -> None:
    model, _ = load_model("fast", "slice", 2)
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    planes = np.random.default_rng(0).random((2, 40, 40), dtype=np.float32)
    kw = {"device": "cpu", "batch_size": 2, "tile_size": 24, "tile_overlap": 8, "margin": 3}
    try:
        full, tiles = upsample_planes(model, planes, 2, 2, amp=False, **kw)
        assert set(seen) == {torch.float32}
        seen.clear()
        mixed, tiles_mixed = upsample_planes(model, planes, 2, 2, amp=True, **kw)
        assert set(seen) == {AMP_DTYPE["cpu"]}  # every conv ran in reduced precision
    finally:
        for h in hooks:
            h.remove()
    assert tiles == tiles_mixed > 1  # the tiled blend ran on the mixed path too
    assert mixed.dtype == np.float32 and mixed.shape == (2, 80, 80)
    assert np.isfinite(mixed).all()
    # bfloat16 keeps 8 mantissa bits: close to, but not bit-equal with, float32
    assert 0 < float(np.abs(mixed - full).max()) < 0.05
    with amp_context("cpu", False):
        assert not torch.is_autocast_enabled("cpu")


def test_mixed_precision_keeps_the_quality_of_float32() -> None:
    hr, lr, spacing, modality = _case()
    exact = _enhance(lr, spacing, modality, precision="float32")
    mixed = _enhance(lr, spacing, modality, precision="mixed")
    baseline = inference.enhance_volume(
        lr, spacing, spacing[0], modality,
        EnhanceRequest(mode="slice", scale=2, model="bicubic", device="cpu"))
    assert exact.extra["precision"] == "float32" and mixed.extra["precision"] == "mixed"
    assert not np.array_equal(exact.volume, mixed.volume)  # the mixed path did run

    def score(v: np.ndarray) -> float:
        return psnr(normalise_for_metrics(v, hr, modality), normalise_for_metrics(hr, hr, modality))

    gain_exact = score(exact.volume) - score(baseline.volume)
    gain_mixed = score(mixed.volume) - score(baseline.volume)
    assert gain_exact > 0.5, gain_exact
    assert abs(gain_mixed - gain_exact) < 0.1, (gain_mixed, gain_exact)


def test_unknown_precision_is_refused() -> None:
    _, lr, spacing, modality = _case()
    with pytest.raises(UnsupportedRequestError, match="precision"):
        _enhance(lr, spacing, modality, precision="half")


def test_cuda_out_of_memory_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU that runs out of memory mid-job: the job finishes on the CPU and says so."""
    _, lr, spacing, modality = _case()
    expected = _enhance(lr, spacing, modality)
    real_run = inference._run
    devices: list[str] = []

    def run_on(model, planes, fy, fx, device, request, ensemble=False):  # noqa: ANN001, ANN202
        devices.append(device)
        if device == "cuda":  # what a full GPU raises from inside the forward pass
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(model, planes, fy, fx, device, request, ensemble)

    monkeypatch.setattr(inference, "resolve_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(inference, "_run", run_on)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result = _enhance(lr, spacing, modality)
    assert devices == ["cuda", "cpu"]
    assert result.device == "cpu" and result.extra["device_fallback"] == "CUDA out of memory"
    np.testing.assert_array_equal(result.volume, expected.volume)
