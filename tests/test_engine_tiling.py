"""Tiling with overlap equals a single pass; device selection falls back to the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sr_engine import EnhanceRequest, enhance_volume
from sr_engine.data import ct_phantom
from sr_engine.models import build_model
from sr_engine.models.base import receptive_field
from sr_engine.tiling import ramp, tile_starts, upsample_planes


def _phantom(z: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.stack([ct_phantom(size, rng) for _ in range(z)]).astype(np.float32)


def test_tile_starts_cover_the_axis() -> None:
    for length, tile, overlap in ((100, 32, 8), (33, 32, 8), (32, 32, 8), (257, 64, 16)):
        starts = tile_starts(length, tile, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all()
        assert starts[-1] + min(tile, length) == length


def test_ramp_is_zero_in_margin_of_inner_edges() -> None:
    w = ramp(10, 32, 100, 12, 4)
    assert np.all(w[:4] == 0) and np.all(w[-4:] == 0) and w[16] == 1


@pytest.mark.parametrize("mode,scale,model", [("slice", 2, "fast"), ("volume", 2, "fast"),
                                              ("slice", 2, "lanczos6"), ("slice", 4, "lanczos3")])
def test_tiled_equals_single_pass(mode: str, scale: int, model: str) -> None:
    """Tiles with the engine's halo give the single pass, also for the long Lanczos windows
    (``lanczos6`` reaches 6 input pixels either side)."""
    vol = _phantom(3, 70)
    one = enhance_volume(vol, (2.0, 1.0, 1.0), 2.0, "CT",
                         EnhanceRequest(mode=mode, scale=scale, model=model, tile_size=512))
    tiled = enhance_volume(vol, (2.0, 1.0, 1.0), 2.0, "CT",
                           EnhanceRequest(mode=mode, scale=scale, model=model, tile_size=24,
                                          tile_overlap=12, batch_size=5))
    assert one.extra["tiles_per_plane"] == (1 if mode == "slice" else 2)
    assert tiled.extra["tiles_per_plane"] > one.extra["tiles_per_plane"]
    np.testing.assert_allclose(tiled.volume, one.volume, atol=0.05, rtol=0)


def test_tiling_large_receptive_field_model() -> None:
    torch.manual_seed(0)
    model = build_model("residual", "slice", 2).eval()
    planes = (_phantom(2, 64) + 1024) / 4096
    margin = receptive_field(model) // 2 + 1
    full, n1 = upsample_planes(model, planes, 2, 2, device="cpu", batch_size=4, tile_size=128,
                               tile_overlap=0, margin=0)
    tiled, n2 = upsample_planes(model, planes, 2, 2, device="cpu", batch_size=3, tile_size=40,
                                tile_overlap=2 * margin + 2, margin=margin)
    assert n1 == 1 and n2 > 1
    np.testing.assert_allclose(tiled, full, atol=1e-5, rtol=0)


def test_cuda_request_falls_back_to_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the fallback path cannot be exercised")
    vol = _phantom(1, 32)
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT",
                         EnhanceRequest(model="auto", device="cuda", estimate_degradation=False))
    assert res.device == "cpu"
    assert res.model_name == "fast"
    assert "CUDA" in str(res.extra["device_fallback"])
    assert res.volume.shape == (1, 64, 64)
