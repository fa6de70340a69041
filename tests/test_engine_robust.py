"""Degradation families, the per-series estimate, the interpolation fallback (issue 10)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from sr_engine import DegradationEstimate, EnhanceRequest, check_consistency, enhance_volume
from sr_engine.data import ct_phantom, mr_phantom
from sr_engine.degrade import Degradation, apply_inplane, apply_throughplane
from sr_engine.estimate import estimate_inplane, estimate_slab
from sr_engine.evaluation import normalise_for_metrics, psnr
from sr_engine.normalise import mapping_for

SEED = 424242  # not a training seed: these phantoms are held out


def _hr_stack(modality: str, n: int = 8, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    make = ct_phantom if modality == "CT" else mr_phantom
    scale = 1.0 if modality == "CT" else 1000.0
    return np.stack([scale * make(size, rng) for _ in range(n)]).astype(np.float32)


def _degrade(hr: np.ndarray, modality: str, deg: Degradation, scale: int = 2) -> np.ndarray:
    mapping = mapping_for(hr, modality)
    with torch.inference_mode():
        x = torch.from_numpy(mapping.forward(hr)).unsqueeze(1)
        return mapping.inverse(apply_inplane(x, scale, deg).squeeze(1).numpy())


@pytest.mark.parametrize(("deg", "family"), [
    (Degradation.of("area", sigma_n=0.0), "area"),
    (Degradation.of("area", sigma_n=0.5), "area"),
    (Degradation.of("lanczos", lobes=3), "lanczos"),
    (Degradation.of("kspace", window=1), "kspace"),
    (Degradation.of("kspace", window=2, fermi_radius=0.9), "kspace"),
])
def test_inplane_estimate_picks_the_family(deg: Degradation, family: str) -> None:
    hr = _hr_stack("CT")
    lr = _degrade(hr, "CT", deg)
    est = estimate_inplane(mapping_for(lr, "CT").forward(lr), 2)
    assert est.in_family, est.reason
    assert est.operator == family, est


def test_slab_estimate_tells_thin_from_wide_profiles() -> None:
    rng = np.random.default_rng(SEED)
    from sr_engine.data import ct_phantom_volume

    vol = ct_phantom_volume((64, 96, 96), rng)
    x = torch.from_numpy(mapping_for(vol, "CT").forward(vol).transpose(2, 0, 1).copy())
    fwhm = {}
    for width in (0.7, 1.3):
        with torch.inference_mode():
            lr = apply_throughplane(x.unsqueeze(1), 4, Degradation.of("gaussian", fwhm=width))
        est = estimate_slab(np.ascontiguousarray(lr.squeeze(1).numpy().transpose(1, 2, 0)), 4)
        assert est.in_family and est.mode == "volume"
        fwhm[width] = est.parameters["fwhm"]
        # every family's best member is recorded (the adaptation hedges over them); the
        # estimate is the family with the lowest misfit
        p = est.parameters
        misfits = {f: p[f"misfit_{f}"] for f in ("box", "gaussian", "sinc")}
        assert min(misfits, key=lambda f: misfits[f]) == est.family
        assert p[f"fwhm_{est.family}"] == p["fwhm"] and misfits[est.family] == p["misfit"]
    assert fwhm[1.3] - fwhm[0.7] >= 0.3


def _slab_estimate(misfits: dict[str, float], in_family: bool = True) -> DegradationEstimate:
    fwhm = {"box": 1.0, "gaussian": 0.8, "sinc": 1.1}
    best = min(misfits, key=lambda f: misfits[f])
    params = {"fwhm": fwhm[best], "misfit": misfits[best]}
    for f, m in misfits.items():
        params[f"fwhm_{f}"], params[f"misfit_{f}"] = fwhm[f], m
    return DegradationEstimate(best, params, 0.9, in_family, "volume", None, best)


def test_adaptation_hedges_over_the_profile_families_the_data_cannot_tell_apart() -> None:
    """``posterior`` (the default): families in proportion to how well they fit, interleaved."""
    from sr_engine.estimate import ADAPT_POLICY, ADAPT_POSTERIOR_SCALE, adaptation_profiles

    assert ADAPT_POLICY == "posterior"
    close = _slab_estimate({"sinc": 0.010, "box": 0.012, "gaussian": 0.050})
    # the calibrated temperature (0.15): weights 1, e^-0.013, e^-0.27 of 12 turns: 4, 4, 3
    assert ADAPT_POSTERIOR_SCALE == pytest.approx(0.15)
    mix = adaptation_profiles(close, 1.0)
    assert [(d.family, d.get("fwhm")) for d in mix[:3]] == [
        ("sinc", 1.1), ("box", 1.0), ("gaussian", 0.8)]
    assert [sum(d.family == f for d in mix) for f in ("sinc", "box", "gaussian")] == [4, 4, 3]
    # a colder posterior (0.01): weights 1, e^-0.2 and e^-4: sinc 7, box 5, gaussian 0
    cold = adaptation_profiles(close, 1.0, posterior_scale=0.01)
    assert len(cold) == 12
    assert [(d.family, d.get("fwhm")) for d in cold[:2]] == [("sinc", 1.1), ("box", 1.0)]
    assert sum(d.family == "sinc" for d in cold) == 7 and sum(d.family == "box" for d in cold) == 5
    # a clear winner is followed alone
    clear = _slab_estimate({"sinc": 0.010, "box": 1.0, "gaussian": 1.3})
    assert {(d.family, d.get("fwhm")) for d in adaptation_profiles(clear, 1.0)} == {("sinc", 1.1)}
    # the other policies
    assert [d.family for d in adaptation_profiles(close, 1.0, "estimated")] == ["sinc"]
    assert [d.family for d in adaptation_profiles(close, 1.0, "families")] == [
        "sinc", "box", "gaussian"]
    assert [d.family for d in adaptation_profiles(close, 1.0, "top2")] == ["sinc", "box"]
    # the header's width: each posterior turn followed by its family at the nominal FWHM
    both = adaptation_profiles(close, 1.25, "posterior-nominal", posterior_scale=0.01)
    assert len(both) == 24
    assert [(d.family, d.get("fwhm")) for d in both[:4]] == [
        ("sinc", 1.1), ("sinc", 1.25), ("box", 1.0), ("box", 1.25)]
    header = adaptation_profiles(close, 1.25, "nominal", posterior_scale=0.01)
    assert {d.get("fwhm") for d in header} == {1.25} and len(header) == 12
    assert sum(d.family == "sinc" for d in header) == 7
    # outside every family, or no estimate: the header's box slab
    for est in (_slab_estimate({"sinc": 0.5, "box": 0.6}, in_family=False), None):
        (only,) = adaptation_profiles(est, 1.25)
        assert only.family == "box" and only.get("fwhm") == 1.25
    with pytest.raises(ValueError, match="unknown adaptation policy"):
        adaptation_profiles(close, 1.0, "guess")


def test_adaptation_takes_its_profiles_in_turn_and_stops_at_max_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sr_engine import training
    from sr_engine.data import mr_phantom_volume
    from sr_engine.models import load_model

    hr = mr_phantom_volume((48, 64, 64), np.random.default_rng(SEED))
    vol = hr.reshape(12, 4, 64, 64).mean(axis=1).astype(np.float32)
    net, _ = load_model("fast", "volume", 4)
    used: list[str] = []
    real = training.apply_throughplane

    def recording(x: torch.Tensor, factor: int, deg: Degradation,
                  gen: torch.Generator | None = None) -> torch.Tensor:
        if gen is not None:  # the training steps (the fixed evaluation batch has none)
            used.append(deg.family)
        return real(x, factor, deg, gen)

    monkeypatch.setattr(training, "apply_throughplane", recording)
    mix = [Degradation.of("sinc", fwhm=1.1), Degradation.of("box", fwhm=1.0),
           Degradation.of("sinc", fwhm=1.1)]
    report = training.adapt_on_series(net, vol, 4, mix, seconds=3600.0, max_steps=5)
    assert report["steps"] == 5, report
    assert used == ["sinc", "box", "sinc", "sinc", "box"]
    assert report["profiles"] == "sinc 1.1 x2, box 1 x1"


def test_adaptation_keeps_the_stated_share_of_its_fine_tune() -> None:
    """``keep``: weights end at ``shipped + keep * (adapted - shipped)`` after the same steps."""
    from sr_engine import training
    from sr_engine.data import mr_phantom_volume
    from sr_engine.models import load_model

    hr = mr_phantom_volume((48, 64, 64), np.random.default_rng(SEED))
    vol = hr.reshape(12, 4, 64, 64).mean(axis=1).astype(np.float32)
    profile = Degradation.of("box", fwhm=1.0)
    weights = {}
    torch.manual_seed(0)
    for keep in (1.0, 0.5, 0.0):
        net, _ = load_model("fast", "volume", 4)
        shipped = [p.detach().clone() for p in net.parameters()]
        report = training.adapt_on_series(net, vol, 4, profile, seconds=3600.0, max_steps=4,
                                          keep=keep)
        assert report["steps"] == 4 and report["keep"] == keep
        weights[keep] = [p.detach().clone() for p in net.parameters()]
    moved = max(float((a - s).abs().max()) for a, s in zip(weights[1.0], shipped, strict=True))
    assert moved > 1e-5  # the fine-tune did change the weights
    for s0, full, half, none in zip(shipped, weights[1.0], weights[0.5], weights[0.0],
                                    strict=True):
        assert torch.equal(none, s0)
        assert torch.allclose(half, s0 + 0.5 * (full - s0), atol=1e-6)
    with pytest.raises(ValueError, match="keep"):
        training.adapt_on_series(net, vol, 4, profile, seconds=1.0, keep=1.5)


def test_outside_every_family_falls_back_to_interpolation() -> None:
    hr = _hr_stack("MR")
    lr = _degrade(hr, "MR", Degradation.of("area", sigma_n=0.3))
    weird = ndimage.gaussian_filter1d(lr, 2.5, axis=2)  # strong blur along x only
    res = enhance_volume(weird, (1.0, 2.0, 2.0), 1.0, "MR", EnhanceRequest())
    assert res.degradation is not None and not res.degradation.in_family
    assert res.model_name == "bicubic" and res.fallback_reason
    assert "interpolation bicubic" in res.describe() and len(res.describe()) < 200
    plain = enhance_volume(weird, (1.0, 2.0, 2.0), 1.0, "MR",
                           EnhanceRequest(model="bicubic", estimate_degradation=False))
    np.testing.assert_allclose(res.volume, plain.volume)


@pytest.mark.parametrize("deg", [Degradation.of("area", sigma_n=0.0),
                                 Degradation.of("kspace", window=0),
                                 # aliased, off-centre sampling: no family, looks sharp
                                 Degradation.of("decimate", phase_y=0.0, phase_x=0.0),
                                 Degradation.of("decimate", phase_y=0.5, phase_x=0.5)])
def test_node_choice_not_worse_than_bicubic(deg: Degradation) -> None:
    hr = _hr_stack("CT", n=6)
    lr = _degrade(hr, "CT", deg)
    scores = {}
    for model in ("auto", "bicubic"):
        res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest(model=model))
        ref = normalise_for_metrics(hr, hr, "CT")
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, "CT"), ref)
    assert scores["auto"] >= scores["bicubic"] - 0.1, scores


def test_consistency_uses_the_estimated_operator() -> None:
    hr = _hr_stack("CT", n=4)
    deg = Degradation.of("kspace", window=0)
    lr = _degrade(hr, "CT", deg)
    res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest())
    again = check_consistency(res, lr, (1.0, 2.0, 2.0), 1.0, "CT", "slice", 2)
    assert again.mean_abs_error == pytest.approx(res.consistency.mean_abs_error, rel=1e-5)
    # The true HR re-degraded with the k-space operator reproduces the input; the nominal
    # Gaussian operator does not.
    truth = dataclasses.replace(res, volume=hr)
    kspace = DegradationEstimate("kspace_sharp", {}, 1.0, True, "slice")
    exact = check_consistency(truth, lr, (1.0, 2.0, 2.0), 1.0, "CT", "slice", 2, kspace)
    nominal = check_consistency(dataclasses.replace(truth, degradation=None), lr,
                                (1.0, 2.0, 2.0), 1.0, "CT", "slice", 2)
    assert exact.mean_abs_error < 0.2 * nominal.mean_abs_error
    assert exact.mean_abs_error < 1.0


def test_estimate_can_be_switched_off_and_explicit_models_are_obeyed() -> None:
    hr = _hr_stack("CT", n=2, size=96)
    lr = _degrade(hr, "CT", Degradation.of("kspace", window=0))
    off = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT",
                         EnhanceRequest(model="fast", estimate_degradation=False))
    assert off.degradation is None and off.fallback_reason is None and off.model_name == "fast"
    on = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest(model="fast"))
    assert on.degradation is not None and on.model_name == "fast"
    np.testing.assert_allclose(on.volume, off.volume)


def test_volume_adaptation_reports_its_work() -> None:
    rng = np.random.default_rng(SEED)
    from sr_engine.data import mr_phantom_volume

    vol = 1000.0 * mr_phantom_volume((48, 64, 64), rng)
    thick = vol.reshape(12, 4, 64, 64).mean(axis=1)
    req = EnhanceRequest(mode="volume", scale=4, model="fast", adapt_seconds=2.0,
                         self_ensemble=False)
    res = enhance_volume(thick, (4.0, 1.0, 1.0), 4.0, "MR", req)
    assert res.adaptation is not None and res.adaptation["steps"] > 0
    # the profiles it trained on are reported, the estimated one first
    assert res.degradation is not None
    assert str(res.adaptation["profiles"]).startswith(f"{res.degradation.family} "), res
    assert res.volume.shape == (48, 64, 64)
    assert res.model_version.endswith("-adapted")


def test_adaptation_lowers_the_loss_on_the_series_own_pairs() -> None:
    """40 steps (counted by an injected clock, whatever the machine's load) reduce the loss."""
    from sr_engine.data import mr_phantom_volume
    from sr_engine.models import load_model
    from sr_engine.training import adapt_on_series

    hr = mr_phantom_volume((48, 64, 64), np.random.default_rng(SEED))
    vol = hr.reshape(12, 4, 64, 64).mean(axis=1).astype(np.float32)
    net, _ = load_model("fast", "volume", 4)
    ticks = iter(np.arange(0.0, 1000.0, 1.0))
    report = adapt_on_series(net, vol, 4, Degradation.of("gaussian", fwhm=1.2), seconds=40.5,
                             clock=lambda: float(next(ticks)))
    assert report["steps"] == 40, report
    assert report["loss_after"] < report["loss_before"], report


def test_adaptation_averages_the_weights_of_the_second_half() -> None:
    """``average_from=0.5``: the weights kept are the mean of those after each late step."""
    import torch

    from sr_engine.data import mr_phantom_volume
    from sr_engine.models import load_model
    from sr_engine.training import adapt_on_series

    hr = mr_phantom_volume((48, 64, 64), np.random.default_rng(SEED))
    vol = hr.reshape(12, 4, 64, 64).mean(axis=1).astype(np.float32)
    net, _ = load_model("fast", "volume", 4)
    snapshots: list[list[torch.Tensor]] = []
    ticks = iter(np.arange(0.0, 100.0, 1.0))

    def clock() -> float:
        # every reading of the clock records the weights at that moment
        snapshots.append([p.detach().clone() for p in net.parameters()])
        return float(next(ticks))

    report = adapt_on_series(net, vol, 4, Degradation.of("gaussian", fwhm=1.0), seconds=4.5,
                             average_from=0.5, clock=clock)
    # loop readings see 1, 2, 3, 4 elapsed (4 steps), then 5: stop; steps at 3 and 4 are averaged
    assert report["steps"] == 4, report
    after_step_3, after_step_4, final = snapshots[-3], snapshots[-2], snapshots[-1]
    for a, b, f in zip(after_step_3, after_step_4, final, strict=True):
        torch.testing.assert_close(f, (a + b) / 2)
    assert any(not torch.equal(b, f) for b, f in zip(after_step_4, final, strict=True))


def test_adaptation_stops_when_its_time_budget_is_spent() -> None:
    """The budget bounds the optimisation loop (an injected clock: no wall-clock timing)."""
    from sr_engine.data import mr_phantom_volume
    from sr_engine.models import load_model
    from sr_engine.training import adapt_on_series

    hr = mr_phantom_volume((48, 64, 64), np.random.default_rng(SEED))
    vol = hr.reshape(12, 4, 64, 64).mean(axis=1).astype(np.float32)
    net, _ = load_model("fast", "volume", 2)
    ticks = iter(np.arange(0.0, 100.0, 0.25))  # every reading of the clock is 0.25 s later

    report = adapt_on_series(net, vol, 2, Degradation.of("box", fwhm=1.0), seconds=1.0,
                             clock=lambda: float(next(ticks)))
    # the loop starts at 0.25 and sees 0.25, 0.5, 0.75 elapsed (3 steps), then 1.0: stop
    assert report["steps"] == 3, report
    assert report["seconds"] == 1.5  # set-up reading + loop + the final reading
    zero = adapt_on_series(net, vol, 2, Degradation.of("box", fwhm=1.0), seconds=0.0)
    assert zero["steps"] == 0


def _smooth_hr_stack(modality: str, kind: str, amount: float, window: int,
                     n: int = 6, size: int = 160) -> np.ndarray:
    """Held-out phantoms made smooth at their own matrix (zero-filled MR, soft-kernel CT)."""
    from sr_engine.degrade import smooth_hr

    hr = _hr_stack(modality, n, size)
    mapping = mapping_for(hr, modality)
    x = np.stack([smooth_hr(s, kind, amount, window) for s in mapping.forward(hr)])
    return np.maximum(mapping.inverse(x), float(hr.min())).astype(np.float32)


@pytest.mark.parametrize(("modality", "kind", "amount", "window", "deg"), [
    ("MR", "zerofill", 0.5, 1, Degradation.of("lanczos", lobes=3)),
    ("MR", "zerofill", 0.6, 0, Degradation.of("area", sigma_n=0.0)),
    ("CT", "gaussian", 1.0, 0, Degradation.of("lanczos", lobes=3)),
])
def test_smooth_hr_with_a_sharp_degradation_gets_no_deblurring(
        modality: str, kind: str, amount: float, window: int, deg: Degradation) -> None:
    """A series already smooth at its own matrix, degraded by a sharp operator, looks like a
    sharp series blurred: the node must not sharpen it beyond what bicubic does."""
    hr = _smooth_hr_stack(modality, kind, amount, window)
    lr = _degrade(hr, modality, deg)
    scores, picks = {}, {}
    ref = normalise_for_metrics(hr, hr, modality)
    for model in ("auto", "bicubic"):
        res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, modality, EnhanceRequest(model=model))
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, modality), ref)
        picks[model] = res.extra.get("weights_group")
    assert picks["auto"] not in ("area_soft", "kspace_smooth"), (picks, scores)
    assert scores["auto"] >= scores["bicubic"] - 0.1, (picks, scores)


@pytest.mark.parametrize(("modality", "kind", "amount", "window", "deg", "gain"), [
    ("MR", "zerofill", 0.5, 1, Degradation.of("area", sigma_n=0.0), 1.0),
    ("CT", "gaussian", 1.0, 0, Degradation.of("kspace", window=0), 0.4),
])
def test_smooth_hr_sharply_degraded_gains_from_the_safer_interpolation(
        modality: str, kind: str, amount: float, window: int, deg: Degradation,
        gain: float) -> None:
    """Where no learned weights are safe (a smooth image sharply degraded looks like a sharp
    one blurred), the node still beats bicubic: Lanczos-3 blended with bicubic keeps more of
    the detail below the input's Nyquist frequency (shipped tables; bicubic gained 0 here)."""
    hr = _smooth_hr_stack(modality, kind, amount, window)
    lr = _degrade(hr, modality, deg)
    ref = normalise_for_metrics(hr, hr, modality)
    scores, picks = {}, {}
    for model in ("auto", "bicubic"):
        res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, modality, EnhanceRequest(model=model))
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, modality), ref)
        picks[model] = (res.model_name, res.extra.get("weights_group"), res.interpolated)
    assert picks["auto"][0] == "lanczos3" and picks["auto"][2], picks
    assert scores["auto"] >= scores["bicubic"] + gain, (picks, scores)


def test_selection_is_minimax_over_the_estimate_cell() -> None:
    """The node takes the weights with the best *worst* validation gain of the estimate's cell,
    not the best mean, and nothing for a cell it has never seen."""
    from sr_engine.estimate import choose_from_table

    table = {"confidence_bins": [0.8],
             "cases": {"kspace_smooth|1": 20, "lanczos|1": 24, "area_sharp|1": 3},
             "by_estimate": {"area_soft": {"kspace_smooth|1": -9.0, "lanczos|1": -2.0,
                                           "area_sharp|1": 1.0},
                             "hedge": {"kspace_smooth|1": 0.4, "lanczos|1": -0.5},
                             "lanczos": {"kspace_smooth|1": 0.1, "lanczos|1": 0.8}}}
    est = {"family": "kspace_smooth", "confidence": 0.95, "in_family": True}
    assert choose_from_table(est, table) == ("hedge", 0.4)
    assert choose_from_table({**est, "family": "lanczos"}, table) == ("lanczos", 0.8)
    assert choose_from_table({**est, "family": "area_sharp"}, table) is None  # 3 cases only
    assert choose_from_table({**est, "confidence": 0.5}, table) is None  # cell kspace_smooth|0
    assert choose_from_table({**est, "in_family": False}, table) is None


def test_slice_x4_keeps_the_expected_worst_case_pick_only_when_its_cell_agrees() -> None:
    """Slice x4 (``guard`` table): the class-probability pick is used only when the weights also
    kept a positive worst case over the validation cases the estimator put in the same cell."""
    from sr_engine.estimate import INPLANE_GROUPS, choose_guarded

    worst = {g: {t: (1.0 if g == t else -2.0) for t in INPLANE_GROUPS} for g in INPLANE_GROUPS}
    worst["lanczos"]["kspace_sharp"] = 0.3  # lanczos weights also look safe on k-space data
    table = {"min": worst, "mean": worst,
             "guard": {"confidence_bins": [0.8],
                       "cases": {"lanczos|1": 24, "kspace_sharp|1": 20, "area_sharp|1": 3},
                       "by_estimate": {"lanczos": {"lanczos|1": 0.6, "kspace_sharp|1": -0.4},
                                       "kspace_sharp": {"kspace_sharp|1": 0.2}}}}

    def est(family: str, p: float = 0.95) -> dict:
        probs = {f"p_{g}": (p if g == family else (1 - p) / 4) for g in INPLANE_GROUPS}
        return {"family": family, "confidence": p, "in_family": True, "parameters": probs}

    # lanczos estimate: expected 0.95 * 1.0 + 0.0125 * (0.3 - 6) = 0.879, cell worst 0.6
    assert choose_guarded(est("lanczos"), table) == ("lanczos", 0.6)
    # k-space estimate: the expected rule prefers kspace_sharp weights (its cell keeps +0.2)
    assert choose_guarded(est("kspace_sharp"), table) == ("kspace_sharp", 0.2)
    # ... but where it would pick lanczos, the cell's worst case (-0.4) vetoes it
    worst["kspace_sharp"]["kspace_sharp"] = 0.1
    pick = choose_guarded(est("kspace_sharp"), table)
    assert pick is not None and pick[0] == "lanczos" and pick[1] == -0.4
    # a cell with too few validation cases gets nothing
    assert choose_guarded(est("area_sharp"), table) == ("none", -99.0)
    assert choose_guarded({"family": "lanczos", "confidence": 0.9, "in_family": True,
                           "parameters": {}}, table) is None  # no class probabilities


def test_shipped_slice_x4_table_is_guarded() -> None:
    """The shipped x4 table holds both rules (``eval_robust --validation --guarded-rule 4``)."""
    import json

    from sr_engine.estimate import MIN_CELL_CASES, gains_path

    table = json.loads(gains_path(4).read_text())
    assert {"mean", "min", "guard"} <= set(table) and "by_estimate" not in table
    assert table["guard"]["confidence_bins"] == [0.8]
    assert max(table["guard"]["cases"].values()) >= MIN_CELL_CASES


def test_smooth_looking_estimates_never_get_weights_on_the_shipped_table() -> None:
    """On the shipped slice x2 table, an input that looks blurred (it may be a smooth image
    degraded sharply) goes out as interpolation (bicubic, or a sharper kernel where the cell
    found it safe), whatever the confidence: never learned weights."""
    from sr_engine.inference import choose_model
    from sr_engine.tasks import BASELINE_MODELS

    for family in ("kspace_smooth", "area_soft"):
        for confidence in (0.5, 0.99):
            est = DegradationEstimate(family, {}, confidence, True, "slice")
            name, group, reason = choose_model("auto", "fast", "slice", 2, est)
            assert name in BASELINE_MODELS, (family, confidence, name, group)
            assert group is None or group.startswith(f"{name}@"), group
            assert reason and "safe" in reason


def test_a_thin_cell_is_not_trusted_with_weights() -> None:
    """A cell needs ``MIN_CELL_CASES`` validation cases before its worst case is trusted.  The
    case it guards against: leave-one-volume-out with 8 as the minimum, the table built without
    ``val_mr_4`` kept ``kspace_sharp@0.5`` (worst +1.17 dB) in a 13-case cell, and it lost 3.22 dB
    on that volume (a zero-filled MR phantom with Fermi-filtered k-space)."""
    import json

    from sr_engine.estimate import INPLANE_GROUPS, MIN_CELL_CASES, choose_from_table, gains_path
    from sr_engine.inference import choose_model

    by = {"kspace_sharp@0.5": {"kspace_sharp|0": 1.17}, "lanczos3@0.25": {"kspace_sharp|0": 0.03}}
    table = {"confidence_bins": [0.8], "cases": {"kspace_sharp|0": 13}, "by_estimate": by}
    est = {"family": "kspace_sharp", "confidence": 0.5, "in_family": True,
           "parameters": {"noise": 0.002}}
    assert choose_from_table(est, table) is None  # 13 cases: not enough
    table["cases"]["kspace_sharp|0"] = 20
    assert choose_from_table(est, table) == ("kspace_sharp@0.5", 1.17)
    # shipped tables: a cell with too few cases goes out as bicubic
    guard = json.loads(gains_path(4).read_text())["guard"]
    thin = [c for c, n in guard["cases"].items() if n < MIN_CELL_CASES]
    assert thin, guard["cases"]
    family, conf_bin = thin[0].split("|")
    d = DegradationEstimate(family, {"noise": 0.002, **{f"p_{g}": 0.2 for g in INPLANE_GROUPS}},
                            0.9 if conf_bin == "1" else 0.65, True, "slice")
    name, group, reason = choose_model("auto", "fast", "slice", 4, d)
    assert (name, group) == ("bicubic", None), (thin, name, group, reason)


def test_residual_scale_shrinks_the_output_towards_cubic() -> None:
    """``group@alpha`` is the group's weights with alpha times their residual over cubic."""
    from sr_engine.models import load_model, split_group
    from sr_engine.models.base import interpolate

    full, version = load_model("fast", "slice", 2, None, "hedge")
    half, half_version = load_model("fast", "slice", 2, None, "hedge@0.5")
    x = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = interpolate(x, 2, 2)
        residual = full(x) - base
        torch.testing.assert_close(half(x), base + 0.5 * residual, atol=1e-6, rtol=0)
    assert float(residual.abs().max()) > 1e-3  # the hedge weights do change the image
    assert half_version == version + "-residual0.5"
    assert split_group("hedge") == ("hedge", 1.0) and split_group(None) == (None, 1.0)
    assert split_group("lanczos@0.25") == ("lanczos", 0.25)
    for bad in ("hedge@0", "hedge@1.5", "hedge@x"):
        with pytest.raises(ValueError):
            split_group(bad)


def test_a_scaled_group_chosen_by_the_table_is_applied_and_described(tmp_path) -> None:  # noqa: ANN001
    """A selection table whose cell picks ``hedge@0.5`` makes the node run the hedge weights
    at half their residual, say so in the DerivationDescription and in the model version."""
    import json

    from sr_engine.estimate import INPLANE_GROUPS

    cells = [f"{g}|{b}" for g in INPLANE_GROUPS for b in (0, 1)]
    hr = _hr_stack("CT", n=4, size=96)
    lr = _degrade(hr, "CT", Degradation.of("area", sigma_n=0.1))
    results = {}
    for pick in ("hedge@0.5", "hedge"):
        folder = tmp_path / pick
        folder.mkdir()
        table = {"confidence_bins": [0.8], "cases": {c: 20 for c in cells},
                 "by_estimate": {pick: {c: 0.5 for c in cells}}}
        (folder / "selection_slice_x2.json").write_text(json.dumps(table))
        results[pick] = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest(),
                                       weights_dir=folder)
    res = results["hedge@0.5"]
    assert res.fallback_reason is None and res.extra["weights_group"] == "hedge@0.5"
    assert res.model_version.endswith("-residual0.5")
    assert "(hedge weights, residual x0.5)" in res.describe()
    assert results["hedge"].extra["weights_group"] == "hedge"
    cubic = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT",
                           EnhanceRequest(model="bicubic", estimate_degradation=False)).volume
    full = results["hedge"].volume
    assert float(np.abs(full - cubic).max()) > 5.0  # the full hedge changes the image (HU)
    # exact where no output needed clipping to the plausible range (air and bone edges may)
    inside = ((full > lr.min()) & (full < lr.max()) & (cubic > lr.min()) & (cubic < lr.max()))
    assert inside.mean() > 0.8
    np.testing.assert_allclose(res.volume[inside], (cubic + 0.5 * (full - cubic))[inside],
                               atol=0.05)


@functools.lru_cache(maxsize=1)
def _validation_phantoms() -> dict[str, tuple[np.ndarray, str]]:
    from sr_engine.data import validation_volumes

    return {n: (np.ascontiguousarray(v[::8]), m)
            for n, v, _, m in validation_volumes(2, (96, 160, 160))}


def decimation_scores(case: str, scale: int, weights_dir: Path | None = None
                      ) -> dict[str, float]:
    """PSNR of the node's choice and of bicubic on a decimated validation phantom."""
    from benchmarks.eval_robust import low_resolution_slices

    volume, modality = _validation_phantoms()[case]
    hr, lr = low_resolution_slices(volume, modality, scale,
                                   Degradation.of("decimate", phase_y=0.0, phase_x=0.0))
    ref = normalise_for_metrics(hr, hr, modality)
    scores = {}
    for model in ("auto", "bicubic"):
        res = enhance_volume(lr, (1.0, float(scale), float(scale)), 1.0, modality,
                             EnhanceRequest(model=model, scale=scale), weights_dir=weights_dir)
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, modality), ref)
    return scores


@pytest.mark.parametrize(("case", "scale"), [("val_mr_0", 2), ("val_ct_0", 2), ("val_ct_1", 4)])
def test_aliased_decimation_is_not_made_worse_than_bicubic(case: str, scale: int) -> None:
    """Every N-th pixel, no antialiasing (the sampling phase is off the block centres): the
    input looks sharp, and the tables built without the stress cases gave it weights that lost
    0.33 (val_mr_0, x2), 0.40 (val_ct_0, x2) and 0.83 dB (val_ct_1, x4) against bicubic."""
    scores = decimation_scores(case, scale)
    assert scores["auto"] >= scores["bicubic"] - 0.1, scores


def _unseen_operators() -> list[tuple[str, object]]:
    from sr_engine.stress import GUARDED_ON_VALIDATION, INPLANE_UNSEEN

    return [(label, op) for label, op in INPLANE_UNSEEN if label not in GUARDED_ON_VALIDATION]


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("label", [label for label, _ in _unseen_operators()])
def test_operators_outside_every_family_never_lose_to_bicubic(modality: str, scale: int,
                                                              label: str) -> None:
    """The promise on degradations no table has seen (``benchmarks/eval_unseen.py``), on the
    held-out test phantoms: antialiased bicubic/bilinear resizing, a wide or anisotropic PSF,
    motion blur, heavy noise, 8-bit quantisation, lossy JPEG, the uncorrected k-space crop.
    The nominal weights lose up to 1.3 dB on some of these (heavy noise, the k-space crop)."""
    from sr_engine.stress import degrade_series

    op = dict(_unseen_operators())[label]
    hr = _hr_stack(modality, n=6)
    lr = degrade_series(hr, modality, op, scale, axis_last=False)
    ref = normalise_for_metrics(hr, hr, modality)
    scores = {}
    for model in ("auto", "bicubic"):
        res = enhance_volume(lr, (1.0, float(scale), float(scale)), 1.0, modality,
                             EnhanceRequest(model=model, scale=scale))
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, modality), ref)
    assert scores["auto"] >= scores["bicubic"] - 0.1, scores


def _x3_sinc_case() -> tuple[np.ndarray, np.ndarray]:
    """Validation CT phantom with x3 thick slices of a narrow sinc profile: (truth, input)."""
    from sr_engine.data import validation_volumes
    from sr_engine.stress import degrade_series

    name, vol, _, modality = validation_volumes(1, (96, 128, 128))[0]
    assert name == "val_ct_0" and modality == "CT"
    return vol, degrade_series(vol, modality, Degradation.of("sinc", fwhm=0.7), 3, axis_last=True)


def test_volume_x3_choice_is_not_worse_than_cubic_where_it_used_to_lose() -> None:
    """Volume x3, a sinc profile the estimate reads as box: the nominal weights the node took
    before the x3 table lost 0.51 dB to cubic here; the table's half-strength pick gains."""
    hr, lr = _x3_sinc_case()
    ref = normalise_for_metrics(hr, hr, "CT")
    scores, groups = {}, {}
    for model in ("auto", "cubic"):
        res = enhance_volume(lr, (3.0, 1.0, 1.0), 3.0, "CT",
                             EnhanceRequest(mode="volume", scale=3, model=model))
        out = res.volume[: hr.shape[0]]
        scores[model] = psnr(normalise_for_metrics(out, hr, "CT"), ref)
        groups[model] = res.extra.get("weights_group")
    assert scores["auto"] >= scores["cubic"] - 0.1, scores
    assert str(groups["auto"]).endswith("@0.5"), groups  # a half-strength profile's weights


def test_shipped_volume_x3_table_weighs_half_strength_weights() -> None:
    import json

    from sr_engine.estimate import volume_selection_path

    table = json.loads(volume_selection_path(3).read_text())
    assert {"nominal", "box", "box@0.5", "gaussian@0.5", "sinc@0.5"} <= set(table["min"])
    assert set(table["min"]["box@0.5"]) == {"box", "gaussian", "sinc"}


def _lanczos_reference(x: np.ndarray, scale: int, axis: int, lobes: int = 3) -> np.ndarray:
    """Lanczos upsampling written from its definition (edge pixels repeated)."""
    x = np.moveaxis(x.astype(np.float64), axis, -1)
    n = x.shape[-1]
    out = np.empty(x.shape[:-1] + (n * scale,))
    for i in range(n * scale):
        pos = (i + 0.5) / scale - 0.5  # pixel-centre aligned, as torch's align_corners=False
        js = np.arange(int(np.floor(pos)) - lobes, int(np.floor(pos)) + lobes + 2)
        t = pos - js
        w = np.where(np.abs(t) < lobes, np.sinc(t) * np.sinc(t / lobes), 0.0)
        out[..., i] = (x[..., np.clip(js, 0, n - 1)] * w).sum(-1) / w.sum()
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("kind", "lobes"), [("lanczos3", 3), ("lanczos6", 6)])
def test_lanczos_interpolation_matches_its_definition(scale: int, kind: str, lobes: int) -> None:
    """``lanczos3`` / ``lanczos6`` (slice: both axes; volume: the slice axis only) are the
    windowed sinc of 3 / 6 lobes, pixel-centre aligned, normalised per phase, edges repeated."""
    from sr_engine.models.base import interpolate

    x = np.random.default_rng(3).random((2, 11, 14)).astype(np.float32)
    t = torch.from_numpy(x)[:, None]
    both = interpolate(t, scale, scale, kind)[:, 0].numpy()
    ref = _lanczos_reference(_lanczos_reference(x, scale, 1, lobes), scale, 2, lobes)
    np.testing.assert_allclose(both, ref, atol=1e-5)
    along_h = interpolate(t, scale, 1, kind)[:, 0].numpy()
    np.testing.assert_allclose(along_h, _lanczos_reference(x, scale, 1, lobes), atol=1e-5)
    flat = interpolate(torch.full((1, 1, 6, 6), 7.0), scale, scale, kind)
    torch.testing.assert_close(flat, torch.full_like(flat, 7.0))  # constants stay constant
    with pytest.raises(ValueError):
        interpolate(t, 2, 2, "sinc")


def test_lanczos3_is_closer_than_bicubic_on_band_limited_detail() -> None:
    """The point of the kernel: detail below the input's Nyquist frequency (a band-limited
    signal sampled at the input's pixel centres) is attenuated less than by bicubic."""
    from sr_engine.models.base import interpolate

    hr_n = 256
    xs = (np.arange(hr_n) + 0.5) / hr_n
    truth = np.sin(2 * np.pi * 40 * xs)[None, :] * np.ones((8, 1))  # 40 cycles: 0.31 of LR Nyq.
    lr = np.sin(2 * np.pi * 40 * (np.arange(128) + 0.5) / 128)[None, :] * np.ones((8, 1))
    t = torch.from_numpy(lr).float()[None, None]
    err = {k: float(np.abs(interpolate(t, 1, 2, k)[0, 0].numpy() - truth)[:, 16:-16].max())
           for k in ("cubic", "lanczos3")}
    assert err["lanczos3"] < 0.6 * err["cubic"], err


def test_lanczos6_is_closer_than_lanczos3_near_the_inputs_nyquist_frequency() -> None:
    """The longer window passes detail close to the input's Nyquist frequency (here 0.7 of it:
    a band-limited input, as an MR image truncated in k-space) with less attenuation."""
    from sr_engine.models.base import interpolate

    xs = (np.arange(256) + 0.5) / 256
    truth = np.sin(2 * np.pi * 45 * xs)[None, :] * np.ones((8, 1))  # 45 cycles: 0.7 of LR Nyq.
    lr = np.sin(2 * np.pi * 45 * (np.arange(128) + 0.5) / 128)[None, :] * np.ones((8, 1))
    t = torch.from_numpy(lr).float()[None, None]
    err = {k: float(np.abs(interpolate(t, 1, 2, k)[0, 0].numpy() - truth)[:, 24:-24].max())
           for k in ("cubic", "lanczos3", "lanczos6")}
    assert err["lanczos6"] < 0.6 * err["lanczos3"] < 0.6 * err["cubic"], err


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_lanczos6_named_by_a_rule_is_closer_on_a_band_limited_series(modality: str) -> None:
    """A series truncated in k-space (Fermi filter; an MR acquired at its own matrix), with
    ``lanczos6`` named explicitly: labelled as interpolation, closer to the truth than bicubic
    and than Lanczos-3."""
    hr = _hr_stack(modality, n=6)
    lr = _degrade(hr, modality, Degradation.of("kspace", window=2, fermi_radius=0.9))
    ref = normalise_for_metrics(hr, hr, modality)
    scores = {}
    for model in ("bicubic", "lanczos3", "lanczos6"):
        res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, modality, EnhanceRequest(model=model))
        scores[model] = psnr(normalise_for_metrics(res.volume, hr, modality), ref)
        assert res.interpolated and res.fallback_reason is None, res.describe()
        assert res.model_version == f"{model}-builtin"
    assert res.describe().startswith("interpolation lanczos6; degradation kspace_sharp")
    assert scores["lanczos6"] >= scores["lanczos3"] + 0.05 >= scores["bicubic"] + 0.1, scores


def test_an_interpolation_chosen_by_the_table_is_labelled_as_interpolation(tmp_path) -> None:  # noqa: ANN001
    """A selection cell that keeps no weights but finds ``lanczos3@0.5`` safe makes the node
    interpolate with Lanczos-3 blended halfway from bicubic, with the reason in the
    DerivationDescription and the derived series marked as interpolation."""
    import json

    from sr_engine.estimate import INPLANE_GROUPS
    from sr_engine.stream import SeriesEnhancer, SeriesFacts

    cells = [f"{g}|{b}" for g in INPLANE_GROUPS for b in (0, 1)]
    table = {"confidence_bins": [0.8], "cases": {c: 20 for c in cells},
             "by_estimate": {"lanczos3@0.5": {c: 0.6 for c in cells},
                             "hedge": {c: 0.2 for c in cells}}}  # below the weights' margin
    (tmp_path / "selection_slice_x2.json").write_text(json.dumps(table))
    hr = _hr_stack("CT", n=4, size=96)
    lr = _degrade(hr, "CT", Degradation.of("kspace", window=0))
    res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest(), weights_dir=tmp_path)
    assert res.model_name == "lanczos3" and res.extra["weights_group"] == "lanczos3@0.5"
    assert res.interpolated and res.model_version == "lanczos3-builtin-residual0.5"
    assert res.describe().startswith("interpolation lanczos3: lanczos3 blended 0.5 from bicubic")
    assert "+0.60 dB" in res.describe()
    plain = {m: enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT",
                               EnhanceRequest(model=m, estimate_degradation=False))
             for m in ("bicubic", "lanczos3")}
    assert plain["lanczos3"].interpolated
    assert plain["lanczos3"].describe() == "interpolation lanczos3"
    cubic, full = plain["bicubic"].volume, plain["lanczos3"].volume
    assert float(np.abs(full - cubic).max()) > 5.0  # Lanczos-3 differs from bicubic (HU)
    inside = ((full > lr.min()) & (full < lr.max()) & (cubic > lr.min()) & (cubic < lr.max()))
    np.testing.assert_allclose(res.volume[inside], (0.5 * (cubic + full))[inside], atol=0.05)
    # with weights above their margin in the cell, the weights win
    table["by_estimate"]["hedge"] = {c: 0.3 for c in cells}
    (tmp_path / "selection_slice_x2.json").write_text(json.dumps(table))
    res = enhance_volume(lr, (1.0, 2.0, 2.0), 1.0, "CT", EnhanceRequest(), weights_dir=tmp_path)
    assert res.model_name == "fast" and res.extra["weights_group"] == "hedge"
    # the streamed (worker) path makes the same choice
    table["by_estimate"]["hedge"] = {c: 0.2 for c in cells}
    (tmp_path / "selection_slice_x2.json").write_text(json.dumps(table))
    mapping = mapping_for(lr, "CT")
    facts = SeriesFacts(lr.shape[0], lr.shape[1], lr.shape[2], (1.0, 2.0, 2.0), 1.0, "CT",
                        float(lr.min()), float(lr.max()), mapping)
    streamed = SeriesEnhancer(EnhanceRequest(), facts, lr, weights_dir=tmp_path)
    assert streamed.name == "lanczos3" and streamed.interpolated
    assert streamed.version == "lanczos3-builtin-residual0.5"


def test_slice_x4_uses_the_cells_safest_interpolation_where_it_keeps_no_weights(tmp_path) -> None:  # noqa: ANN001
    """``guard`` tables: where the learned pick is vetoed (or the confidence is low), the cell's
    safest interpolation is used if its worst validation gain clears the kernels' margin;
    otherwise bicubic."""
    import json

    from sr_engine.estimate import (
        INPLANE_GROUPS,
        MIN_KERNEL_WORST_DB,
        choose_interpolation,
        slice_weights_choice,
    )

    by = {"lanczos": {"lanczos|1": 0.6, "area_soft|1": -3.0},
          "lanczos3@0.5": {"lanczos|1": 0.4, "area_soft|1": MIN_KERNEL_WORST_DB - 0.01,
                           "kspace_sharp|0": 2.0, "kspace_sharp|1": MIN_KERNEL_WORST_DB},
          "lanczos3@0.25": {"lanczos|1": 0.2, "area_soft|1": MIN_KERNEL_WORST_DB - 0.02,
                            "kspace_sharp|0": 1.0, "kspace_sharp|1": -0.5}}
    table = {"confidence_bins": [0.8], "by_estimate": by,
             "cases": {"lanczos|1": 24, "area_soft|1": 30, "kspace_sharp|0": 4,
                       "kspace_sharp|1": 18}}

    def est(family: str, p: float) -> dict:
        probs = {f"p_{g}": (p if g == family else (1 - p) / 4) for g in INPLANE_GROUPS}
        return {"family": family, "confidence": p, "in_family": True, "parameters": probs}

    assert choose_interpolation(est("lanczos", 0.9), table) == ("lanczos3@0.5", 0.4)
    assert choose_interpolation(est("kspace_sharp", 0.9), table) == (
        "lanczos3@0.5", MIN_KERNEL_WORST_DB)  # at the margin: accepted
    assert choose_interpolation(est("area_soft", 0.9), table) is None  # below the margin
    assert choose_interpolation(est("kspace_sharp", 0.5), table) is None  # 4 cases only
    assert choose_interpolation(est("lanczos", 0.9), {**table, "by_estimate": {
        "lanczos": by["lanczos"]}}) is None  # no interpolation in the table
    # the x4 rule: the expected-worst-case pick (lanczos weights) is vetoed by its cell on a
    # k-space estimate, and the cell's interpolation is used instead
    worst = {g: {t: (1.0 if g == t else -2.0) for t in INPLANE_GROUPS} for g in INPLANE_GROUPS}
    guard = {**table, "by_estimate": {**by, "lanczos": {**by["lanczos"], "kspace_sharp|1": -1}}}
    (tmp_path / "selection_slice_x4.json").write_text(
        json.dumps({"min": worst, "mean": worst, "guard": guard}))
    probs = est("kspace_sharp", 0.95)
    estimate = DegradationEstimate("kspace_sharp", probs["parameters"], 0.95, True, "slice")
    pick = slice_weights_choice(estimate, 4, tmp_path)
    assert pick is not None and pick[0] == "lanczos3@0.5", pick
    from sr_engine.inference import choose_model

    name, group, reason = choose_model("auto", "fast", "slice", 4, estimate, tmp_path)
    assert (name, group) == ("lanczos3", "lanczos3@0.5") and reason and "safest" in reason
    # the learned pick where its cell agrees
    estimate = DegradationEstimate("lanczos", est("lanczos", 0.95)["parameters"], 0.95, True,
                                   "slice")
    assert choose_model("auto", "fast", "slice", 4, estimate, tmp_path)[:2] == ("fast", "lanczos")


def test_noise_level_reads_white_noise_and_ignores_smooth_structure() -> None:
    """Immerkaer's mask: planes and ramps give nothing, white noise its standard deviation,
    edges little (median)."""
    from sr_engine.estimate import noise_level

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    ramp = np.stack([0.3 + 0.2 * yy + 0.1 * xx] * 3)
    assert noise_level(ramp) < 1e-6
    for sigma in (0.002, 0.01, 0.03):
        noisy = ramp + sigma * rng.standard_normal(ramp.shape)
        assert abs(noise_level(noisy) - sigma) < 0.1 * sigma, sigma
    phantom = _hr_stack("CT", n=3, size=128)
    x = mapping_for(phantom, "CT").forward(phantom)
    clean = noise_level(x)
    noisy = noise_level(x + 0.02 * rng.standard_normal(x.shape))
    assert clean < 0.005 and abs(noisy - 0.02) < 0.004, (clean, noisy)
    assert noise_level(np.zeros((2, 8, 8))) == 0.0  # too small to say


def test_no_sharper_interpolation_for_a_series_noisier_than_every_validation_case() -> None:
    """A kernel sharper than bicubic also passes more noise: beyond the noisiest validation
    input (``max_noise`` of the table) the cell's interpolation is not used."""
    from sr_engine.estimate import choose_interpolation

    table = {"confidence_bins": [0.8], "cases": {"kspace_sharp|1": 30}, "max_noise": 0.008,
             "by_estimate": {"lanczos3@0.5": {"kspace_sharp|1": 0.2}}}
    est = {"family": "kspace_sharp", "confidence": 0.9, "in_family": True,
           "parameters": {"noise": 0.004}}
    assert choose_interpolation(est, table) == ("lanczos3@0.5", 0.2)
    assert choose_interpolation({**est, "parameters": {"noise": 0.0081}}, table) is None
    assert choose_interpolation({**est, "parameters": {}}, table) is None  # noise unknown
    no_limit = {k: v for k, v in table.items() if k != "max_noise"}
    assert choose_interpolation({**est, "parameters": {}}, no_limit) == ("lanczos3@0.5", 0.2)
