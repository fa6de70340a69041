"""Geometry, spacing and intensity round trips of sr_engine.enhance_volume (both modes)."""

from __future__ import annotations

import numpy as np
import pytest

from sr_engine import (
    EnhanceRequest,
    UnknownModelError,
    UnsupportedRequestError,
    available_models,
    enhance_volume,
)
from sr_engine.normalise import mapping_for


def _smooth_volume(z: int, y: int, x: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    vol = 300 * np.sin(yy / 7.0 + rng.uniform()) * np.cos(xx / 9.0) + 20 * zz - 200
    return vol.astype(np.float32)


def test_available_models_lists_every_architecture() -> None:
    names = available_models()
    for name in ("fast", "srcnn", "residual", "srgan", "bicubic", "cubic", "linear", "auto"):
        assert name in names


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("model", ["fast", "bicubic"])
def test_slice_mode_shapes_spacing_offsets(scale: int, model: str) -> None:
    vol = _smooth_volume(3, 20, 24)
    res = enhance_volume(vol, (2.5, 0.8, 0.7), 2.0, "CT",
                         EnhanceRequest(mode="slice", scale=scale, model=model))
    assert res.volume.shape == (3, 20 * scale, 24 * scale)
    assert res.volume.dtype == np.float32
    assert res.spacing == pytest.approx((2.5, 0.8 / scale, 0.7 / scale))
    assert res.slice_thickness == pytest.approx(2.0)
    assert res.slice_offsets == pytest.approx([0.0, 2.5, 5.0])
    assert res.contributing_slices == [[0], [1], [2]]
    assert res.model_name == model and res.device == "cpu"
    assert res.model_version.startswith(model)


def test_single_slice_works_in_slice_mode() -> None:
    vol = _smooth_volume(1, 16, 16)
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "MR",
                         EnhanceRequest(model="auto", estimate_degradation=False))
    assert res.volume.shape == (1, 32, 32)
    assert res.model_name == "fast"
    # With the estimate (the default), ``auto`` is fast or, with a reason, bicubic.
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "MR", EnhanceRequest(model="auto"))
    assert res.volume.shape == (1, 32, 32) and res.degradation is not None
    assert res.model_name == "fast" or (res.model_name == "bicubic" and res.fallback_reason)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_constant_volume_keeps_its_value(modality: str) -> None:
    value = 40.0 if modality == "CT" else 1234.0
    vol = np.full((2, 16, 16), value, dtype=np.float32)
    for mode, scale in (("slice", 2), ("volume", 3)):
        res = enhance_volume(vol, (3.0, 1.0, 1.0), 3.0, modality,
                             EnhanceRequest(mode=mode, scale=scale, model="fast"))
        np.testing.assert_allclose(res.volume, value, atol=0.02 * abs(value) + 2)
        assert res.consistency.mean_abs_error < 0.05 * abs(value) + 2


def test_mr_mapping_is_exactly_invertible() -> None:
    rng = np.random.default_rng(1)
    vol = (rng.random((4, 8, 8)) * 3000).astype(np.float32)
    mapping = mapping_for(vol, "MR")
    assert np.array_equal(mapping.inverse(mapping.forward(vol)), vol)
    assert mapping.scale >= np.percentile(vol, 99.5)
    ct = mapping_for(vol - 1000, "CT")
    assert (ct.offset, ct.scale) == (1024.0, 4096.0)


def test_mean_intensity_preserved_by_learned_model() -> None:
    vol = _smooth_volume(2, 32, 32)
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(model="fast"))
    down = res.volume.reshape(2, 32, 2, 32, 2).mean(axis=(2, 4))
    assert float(np.abs(down - vol).mean()) < 15.0


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_volume_offsets_follow_the_partition_formula(scale: int) -> None:
    n, dz = 5, 4.0
    vol = _smooth_volume(n, 12, 10)
    res = enhance_volume(vol, (dz, 1.0, 1.0), dz, "CT",
                         EnhanceRequest(mode="volume", scale=scale, model="fast"))
    expected = [i * dz + (j - (scale - 1) / 2) * dz / scale for i in range(n) for j in range(scale)]
    assert res.slice_offsets == pytest.approx(expected)
    assert res.volume.shape == (n * scale, 12, 10)
    assert res.spacing == pytest.approx((dz / scale, 1.0, 1.0))
    assert res.slice_thickness == pytest.approx(dz / scale)
    assert res.contributing_slices == [[i] for i in range(n) for _ in range(scale)]
    assert res.extra["resampled"] is False


def test_volume_with_gap_and_requested_spacing_resamples() -> None:
    n, dz, thickness = 4, 5.0, 3.0
    vol = _smooth_volume(n, 10, 10)
    res = enhance_volume(vol, (dz, 1.0, 1.0), thickness, "MR",
                         EnhanceRequest(mode="volume", scale=2, model="cubic", output_spacing=1.5))
    extent = (n - 1) * dz + thickness
    m = round(extent / 1.5)
    assert res.volume.shape[0] == m
    offs = np.asarray(res.slice_offsets)
    np.testing.assert_allclose(np.diff(offs), 1.5)
    assert offs.mean() == pytest.approx((n - 1) * dz / 2)
    assert res.extra["resampled"] is True
    for c, contrib in zip(offs, res.contributing_slices, strict=True):
        slabs = [i for i in range(n) if abs(c - i * dz) < (thickness + 1.5) / 2 - 1e-9]
        assert contrib == (slabs or contrib)
        assert all(abs(c - i * dz) <= dz for i in contrib)


def test_values_stay_plausible() -> None:
    vol = np.full((2, 16, 16), -1000.0, dtype=np.float32)
    vol[:, 6:10, 6:10] = 3000.0
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(model="fast"))
    assert res.volume.min() >= -1024.0
    assert res.volume.max() <= 3000.0 + 0.1 * 4000.0


def test_ct_padding_is_restored() -> None:
    vol = _smooth_volume(1, 24, 24)
    vol[:, :, :6] = -3024.0
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(model="fast"))
    assert np.all(res.volume[:, :, :12] == -3024.0)
    assert res.volume[:, :, 14:].min() > -1100.0


def test_typed_errors() -> None:
    vol = _smooth_volume(2, 8, 8)
    with pytest.raises(UnsupportedRequestError):
        enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(mode="slice", scale=3))
    with pytest.raises(UnknownModelError):
        enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(model="nope"))
    with pytest.raises(UnsupportedRequestError):
        enhance_volume(vol[0], (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest())  # type: ignore[arg-type]
    with pytest.raises(UnsupportedRequestError):
        enhance_volume(vol[:1], (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(mode="volume"))


@pytest.mark.parametrize("mode,scale", [("slice", 2), ("slice", 4), ("volume", 2), ("volume", 3),
                                        ("volume", 4)])
@pytest.mark.parametrize("model", ["fast", "srcnn", "residual", "srgan", "bicubic", "cubic",
                                   "linear"])
def test_every_model_works_in_every_task(model: str, mode: str, scale: int) -> None:
    vol = _smooth_volume(3, 12, 14)
    res = enhance_volume(vol, (2.0, 1.0, 1.0), 2.0, "MR",
                         EnhanceRequest(mode=mode, scale=scale, model=model))
    expected = (3, 12 * scale, 14 * scale) if mode == "slice" else (3 * scale, 12, 14)
    assert res.volume.shape == expected
    assert np.all(np.isfinite(res.volume))
    assert res.model_name == model


def test_auto_resolution() -> None:
    from sr_engine.models import BEST_BY_TASK, resolve_name

    assert resolve_name("auto", "cpu", "volume", 4) == "fast"
    assert resolve_name("auto", "cuda", "slice", 2) == BEST_BY_TASK[("slice", 2)]
    assert resolve_name("srcnn", "cuda", "slice", 2) == "srcnn"
