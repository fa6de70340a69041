"""Short real training runs: the loss falls, resume continues, seeds are deterministic, and the
trained model beats its baseline on an unseen synthetic case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sr_engine.data import ct_phantom, mr_phantom
from sr_engine.degrade import RandomDegradation, degrade_throughplane, profile_taps
from sr_engine.evaluation import evaluate_volumes, make_lr
from sr_engine.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("weights")
    report = train("fast", "slice", 2, 400, out, seed=1, batch_size=16, phantoms=6,
                   learning_rate=5e-3, progress=False, threads=1)
    return out, report


def test_short_training_lowers_the_loss(trained: tuple[Path, object]) -> None:
    out, report = trained
    assert report.weights.is_file() and report.weights.parent == out
    assert report.final_loss < 0.9 * report.first_loss
    assert len(report.losses) == 400


def test_trained_model_beats_bicubic_on_unseen_phantom(trained: tuple[Path, object]) -> None:
    out, _ = trained
    rng = np.random.default_rng(12345)
    cases = [("ct", np.stack([ct_phantom(96, rng) for _ in range(2)]), (2.0, 0.5, 0.5), "CT"),
             ("mr", 900 * np.stack([mr_phantom(96, rng)]), (2.0, 1.0, 1.0), "MR")]
    res = evaluate_volumes(cases, "slice", 2, "fast", weights_dir=out)
    assert {"cases", "mean_psnr_gain_db", "mean_ssim_gain"} <= set(res)
    assert set(res["cases"][0]) >= {"name", "psnr", "psnr_baseline", "ssim", "ssim_baseline",
                                    "seconds_per_slice"}
    assert res["mean_psnr_gain_db"] > 0.2
    assert all(c["psnr"] > c["psnr_baseline"] for c in res["cases"])


def test_resume_continues_and_seeds_are_deterministic(tmp_path: Path) -> None:
    a = train("srcnn", "volume", 3, 6, tmp_path / "a", seed=5, phantoms=2, progress=False,
              checkpoint_every=4)
    b = train("srcnn", "volume", 3, 6, tmp_path / "b", seed=5, phantoms=2, progress=False)
    wa, wb = load_file(str(a.weights)), load_file(str(b.weights))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train("srcnn", "volume", 3, 9, tmp_path / "a", seed=5, resume=True, phantoms=2,
              progress=False)
    assert c.steps == 9 and len(c.losses) == 3


def test_degradation_operators() -> None:
    taps = profile_taps(4, 4.0, 0.0, pad=0)
    np.testing.assert_allclose(taps, 0.25)
    x = torch.arange(24, dtype=torch.float32).view(1, 1, 12, 2)
    y = degrade_throughplane(x, 3)
    np.testing.assert_allclose(y[0, 0, :, 0].numpy(), [2, 8, 14, 20])
    hr = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    lr = RandomDegradation("slice", 4)(hr, torch.Generator().manual_seed(1))
    assert lr.shape == (3, 1, 8, 8)
    vol = np.random.default_rng(0).random((9, 8, 8)).astype(np.float32)
    hr_c, lr_v, sp, thick = make_lr(vol, (1.0, 1.0, 1.0), "volume", 4)
    assert hr_c.shape[0] == 8 and lr_v.shape == (2, 8, 8) and thick == 4.0 and sp[0] == 4.0
    np.testing.assert_allclose(lr_v[1], vol[4:8].mean(axis=0), atol=1e-6)


def test_self_supervised_finetuning_on_the_series(tmp_path: Path) -> None:
    from sr_engine import EnhanceRequest, enhance_volume
    from sr_engine.training import finetune_on_series

    rng = np.random.default_rng(4)
    series = np.stack([ct_phantom(96, rng) for _ in range(3)]).astype(np.float32)
    rep = finetune_on_series(series, "CT", "fast", "slice", 2, tmp_path, steps=20)
    assert rep.weights.is_file() and len(rep.losses) == 20
    req = EnhanceRequest(model="fast")
    tuned = enhance_volume(series[:1], (1.0, 1.0, 1.0), 1.0, "CT", req, weights_dir=tmp_path)
    shipped = enhance_volume(series[:1], (1.0, 1.0, 1.0), 1.0, "CT", req)
    assert tuned.volume.shape == shipped.volume.shape
    assert tuned.model_version != shipped.model_version
    assert not np.array_equal(tuned.volume, shipped.volume)
