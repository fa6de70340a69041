"""Geometric self-ensemble (flipped passes, un-flipped and averaged) of sr_engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.config import ConfigError, load_config, parse_config
from sr_engine import EnhanceRequest, enhance_volume
from sr_engine.api import resolve_self_ensemble
from sr_engine.inference import _run, ensemble_variants
from sr_engine.models import build_model


def _structured_volume(z: int, y: int, x: int, seed: int = 0) -> np.ndarray:
    """CT-like volume in HU with edges along every axis and no symmetry."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    vol = np.full((z, y, x), -900.0, dtype=np.float32)
    for _ in range(6):
        c = rng.uniform(0, 1, 3) * (z, y, x)
        r = rng.uniform(2, 6, 3)
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        vol[inside <= 1] = rng.uniform(-100, 1200)
    return vol + 50 * np.sin(xx / 3.0 + yy / 5.0).astype(np.float32)


def _symmetric(vol: np.ndarray) -> np.ndarray:
    """Make a volume symmetric under flips of z, y and x."""
    for axis in range(3):
        vol = 0.5 * (vol + np.flip(vol, axis))
    return np.ascontiguousarray(vol, dtype=np.float32)


def test_default_is_on_in_volume_mode_and_off_in_slice_mode() -> None:
    assert resolve_self_ensemble("volume", None) is True
    assert resolve_self_ensemble("volume", "auto") is True
    assert resolve_self_ensemble("slice", None) is False
    assert resolve_self_ensemble("slice", True) is True
    assert resolve_self_ensemble("volume", False) is False
    assert len(ensemble_variants(4, 1)) == 4
    assert len(ensemble_variants(2, 2)) == 8


def test_volume_ensemble_keeps_geometry_and_stays_close() -> None:
    vol = _structured_volume(8, 20, 18)
    args = (vol, (4.0, 1.0, 1.0), 4.0, "CT")
    single = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="fast",
                                                  self_ensemble=False))
    ens = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="fast"))
    cubic = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="cubic"))
    assert ens.extra["self_ensemble"] is True and ens.extra["self_ensemble_passes"] == 4
    assert single.extra["self_ensemble"] is False and single.extra["self_ensemble_passes"] == 1
    assert cubic.extra["self_ensemble"] is False  # interpolation is flip-equivariant
    assert ens.volume.shape == single.volume.shape == (32, 20, 18)
    assert ens.spacing == single.spacing
    assert ens.slice_offsets == single.slice_offsets
    assert ens.contributing_slices == single.contributing_slices
    diff = np.abs(ens.volume - single.volume)
    learned = np.abs(single.volume - cubic.volume)
    assert diff.max() > 0.1  # the flipped passes do change the result...
    assert diff.mean() < 0.5 * learned.mean()  # ...but much less than the model changes cubic


def test_slice_ensemble_when_requested_keeps_shape() -> None:
    vol = _structured_volume(2, 16, 20)
    res = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT",
                         EnhanceRequest(mode="slice", scale=2, model="fast", self_ensemble=True))
    assert res.volume.shape == (2, 32, 40)
    assert res.extra["self_ensemble_passes"] == 8
    default = enhance_volume(vol, (1.0, 1.0, 1.0), 1.0, "CT",
                             EnhanceRequest(mode="slice", scale=2, model="fast"))
    assert default.extra["self_ensemble"] is False


@pytest.mark.parametrize(("fy", "fx"), [(4, 1), (3, 1), (2, 2)])
def test_equivariant_network_ensemble_equals_single_pass(fy: int, fx: int) -> None:
    # Cubic interpolation commutes with flips (and with transposes when fy == fx), so each
    # variant un-flipped must land exactly where the single pass does: checks the un-flipping.
    planes = np.random.default_rng(1).standard_normal((3, 10, 14)).astype(np.float32)
    net = build_model("cubic", "slice" if fy == fx else "volume", fy)
    req = EnhanceRequest(tile_size=8, tile_overlap=4)  # tiled: flips move the tile seams
    single, _ = _run(net, planes, fy, fx, "cpu", req, ensemble=False)
    ens, _ = _run(net, planes, fy, fx, "cpu", req, ensemble=True)
    np.testing.assert_allclose(ens, single, atol=1e-5)


def test_flip_symmetric_planes_ensemble_is_the_symmetrised_single_pass() -> None:
    # A flip-symmetric input is its own flipped copy, so every variant sees the same input and
    # the ensemble must equal the single pass averaged with its own flips.
    planes = np.random.default_rng(2).standard_normal((2, 6, 9)).astype(np.float32)
    planes = 0.25 * (planes + planes[:, ::-1] + planes[:, :, ::-1] + planes[:, ::-1, ::-1])
    net = build_model("fast", "volume", 4)
    req = EnhanceRequest()
    single, _ = _run(net, planes, 4, 1, "cpu", req, ensemble=False)
    ens, _ = _run(net, planes, 4, 1, "cpu", req, ensemble=True)
    sym = 0.25 * (single + single[:, ::-1] + single[:, :, ::-1] + single[:, ::-1, ::-1])
    np.testing.assert_allclose(ens, sym, atol=1e-5)


def test_flip_symmetric_volume_gives_symmetric_output_close_to_single_pass() -> None:
    vol = _symmetric(_structured_volume(8, 20, 20, seed=3))
    args = (vol, (4.0, 1.0, 1.0), 4.0, "CT")
    single = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="fast",
                                                  self_ensemble=False)).volume
    ens = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="fast")).volume
    cubic = enhance_volume(*args, EnhanceRequest(mode="volume", scale=4, model="cubic")).volume
    for axis in range(3):  # the ensemble output is exactly symmetric...
        np.testing.assert_allclose(ens, np.flip(ens, axis), atol=1e-2)
    # ...and close to the single pass.  Not equal: a single pass of the small ``fast`` network
    # is far from flip-equivariant (measured on this volume: mean |single - flipped single|
    # 13 HU along z against a 17 HU mean correction over cubic), which is what the ensemble
    # averages out.
    assert np.abs(ens - single).mean() < 0.6 * np.abs(single - cubic).mean()
    assert np.abs(ens - cubic).mean() > 0.5 * np.abs(single - cubic).mean()


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (True, True), (False, False)])
def test_engine_config_self_ensemble(value: object, expected: bool | None) -> None:
    cfg = parse_config({"engine": {"self_ensemble": value}})
    assert cfg.engine.self_ensemble_request is expected


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_engine_config_rejects_bad_self_ensemble(value: object) -> None:
    with pytest.raises(ConfigError, match="self_ensemble"):
        parse_config({"engine": {"self_ensemble": value}})


def test_shipped_config_documents_self_ensemble_auto() -> None:
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "config.toml").engine.self_ensemble_request is None


def test_evaluate_cli_passes_self_ensemble(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    import dicom_node.pipeline as pipeline
    from dicom_node import cli

    seen: list[object] = []

    def fake(paths: list[Path], **kw: object) -> dict:
        seen.append(kw["self_ensemble"])
        return {"cases": [], "mean_psnr_gain_db": 0.0, "mean_ssim_gain": 0.0}

    monkeypatch.setattr(pipeline, "evaluate_paths", fake)
    monkeypatch.chdir(tmp_path)
    for flag in ([], ["--self-ensemble"], ["--no-self-ensemble"]):
        assert cli.main(["evaluate", "--mode", "volume", "--scale", "4", *flag, "x.nii"]) == 0
    assert seen == [None, True, False]
