"""The re-degradation consistency check passes honest outputs and flags corrupted ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sr_engine import EnhanceRequest, check_consistency, enhance_volume
from sr_engine.data import ct_phantom
from sr_engine.degrade import degrade_inplane


def _lr_ct(z: int = 2, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(7)
    hr = np.stack([ct_phantom(size, rng) for _ in range(z)]).astype(np.float32)
    with torch.inference_mode():
        return degrade_inplane(torch.from_numpy(hr).unsqueeze(1), 2).squeeze(1).numpy()


def test_slice_consistency_flags_corruption() -> None:
    lr = _lr_ct()
    res = enhance_volume(lr, (1.0, 1.0, 1.0), 1.0, "CT", EnhanceRequest(model="fast"))
    again = check_consistency(res, lr, (1.0, 1.0, 1.0), 1.0, "CT", "slice", 2)
    assert again.mean_abs_error == pytest.approx(res.consistency.mean_abs_error, rel=1e-5)
    assert res.consistency.mean_abs_error < 15.0 and res.consistency.psnr > 35.0
    bad = res.volume.copy()
    bad[:, 20:60, 20:60] += 500.0
    report = check_consistency(dataclasses.replace(res, volume=bad), lr, (1.0, 1.0, 1.0), 1.0,
                               "CT", "slice", 2)
    assert report.max_abs_error > 400.0
    assert report.mean_abs_error > 3 * res.consistency.mean_abs_error
    assert report.psnr < res.consistency.psnr - 10


def test_volume_consistency_flags_corruption() -> None:
    rng = np.random.default_rng(2)
    a, b = ct_phantom(48, rng), ct_phantom(48, rng)
    thin = np.stack([a + (b - a) * k / 11 for k in range(12)]).astype(np.float32)
    thick = thin.reshape(4, 3, 48, 48).mean(axis=1)
    res = enhance_volume(thick, (3.0, 1.0, 1.0), 3.0, "CT",
                         EnhanceRequest(mode="volume", scale=3, model="linear"))
    assert res.consistency.mean_abs_error < 15.0
    bad = res.volume.copy()
    bad[4] = 2000.0
    report = check_consistency(dataclasses.replace(res, volume=bad), thick, (3.0, 1.0, 1.0), 3.0,
                               "CT", "volume", 3)
    assert report.max_abs_error > 300.0
    assert report.psnr < res.consistency.psnr - 10
