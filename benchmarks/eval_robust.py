"""Robustness benchmark: every degradation family, the estimate, the node's choice (issue 10).

Slice x2 and x4 on the public pydicom-data CT/MR images under every in-plane degradation of
:mod:`sr_engine.degrade`; volume x2 and x4 on the nilearn MNI152 template with every slab
profile (axial thick slices; x4 also with thick sagittal and coronal slices).  These images are
evaluation data only (never used for training, the estimator or any tuning).  Per case:
interpolation, ``fast`` with its nominal weights, ``fast`` with the weights of the true family
(oracle), the node's choice (``auto``: estimate, family weights or interpolation fallback), the
estimate itself and, in volume mode, the node's choice after per-series adaptation.  The held-out
degradation parameters (``sr_engine.degrade.HELD_OUT``) are reported apart.

Usage: .venv/bin/python -m benchmarks.eval_robust [--tasks slice:2 slice:4 volume:2 volume:4]
       [--adapt-seconds 30] [--threads 2]
Prints a table and writes benchmarks/results/eval_robust.json (and .md: the tables of the README
and the ``fast`` model card).  ``--merge a.json b.json`` rebuilds both from partial runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.eval_public import SLICE_FILES, load_dicom_case, load_mni_case
from benchmarks.volume_run import run_adapted_keeps
from benchmarks.volume_run import run_volume as _run
from sr_engine import EnhanceRequest
from sr_engine.degrade import (
    BENCHMARK_INPLANE,
    BENCHMARK_SLAB,
    INPLANE_GROUPS,
    SLAB_PROFILES,
    SMOOTH_HR_VARIANTS,
    Degradation,
    inplane_group,
    smooth_hr,
)
from sr_engine.estimate import INTERPOLATION_CANDIDATES
from sr_engine.models import find_weights
from sr_engine.normalise import mapping_for
from sr_engine.stress import (
    Operator,
    area_average,
    decimation,
    degrade_series,
    family_sampling,
    kspace_lines,
    sharp_kernel,
    shifted,
)
from sr_engine.training import ADAPT_KEEP

RESULTS = Path(__file__).resolve().parent / "results"
# The benchmark's degradations (label, member, held out): sr_engine.degrade's lists, shared with
# ``srnode evaluate --degradations``.
SLICE_DEGRADATIONS = BENCHMARK_INPLANE
SLAB_DEGRADATIONS = BENCHMARK_SLAB

# Operators outside every family that the validation tables also guard against (``--stress``;
# never trained on): aliased decimation at either sampling phase.  The public benchmark found
# it (``benchmarks.eval_unseen``: the hedging weights lost 0.27-0.41 dB on 3 of 7 images at
# x2); the table is decided on the validation phantoms, like every other choice.
VALIDATION_STRESS: list[tuple[str, Operator]] = [
    ("decimation phase 0", decimation(0)), ("decimation phase 1", decimation(1)),
    ("area, grid off by 1 px", shifted(area_average, 1)),
    # Since 2026-12-06: eval_unseen found the node losing 0.22 dB on an edge-enhancing CT
    # kernel and 0.18 dB on MR partial Fourier (one public image, slice x2, learned weights on
    # an input that looks sharp); stronger members of both kinds than the benchmark's.
    ("CT sharp kernel (unsharp 1.0)", sharp_kernel(1.0, 1.0)),
    ("MR partial Fourier 9/16", kspace_lines(lambda ky, h: ky >= -h / 16, magnitude=True)),
    # The edge-enhancing kernel also after the other families' sampling (2026-12-06: on area
    # sampling only, no validation case landed in the cell `lanczos` >= 0.8, whose weights lost
    # 0.22 dB to the public benchmark's edge-enhanced MR2_UNCR read as `lanczos` 0.80; on
    # Lanczos sampling 30 validation cases land there and those weights lose up to 0.38 dB).
    ("sharp kernel on lanczos3 (unsharp 1.0)",
     sharp_kernel(1.0, 1.0, family_sampling(Degradation.of("lanczos", lobes=3)))),
    ("sharp kernel on kspace (unsharp 1.0)",
     sharp_kernel(1.0, 1.0, family_sampling(Degradation.of("kspace", window=0)))),
]
# Residual scales tried per weights group for the slice x2 table (``group@alpha``: cubic plus
# alpha times the learned residual, :func:`sr_engine.models.split_group`).
# Decided on the validation set leave-one-volume-out (2026-12-06): with 0.5 every left-out
# case stays above -0.1 dB (margin sr_engine.estimate.MIN_CELL_WORST_DB); adding 0.25 (and
# 0.75) raised the in-sample mean but one left-out smooth case lost 2.81 dB (blind@0.25).
RESIDUAL_SCALES = (0.5,)
# Volume tables that also weigh each profile's weights at half their residual: x3 (decided on
# the validation volumes, leave-one-volume-out, 2026-12-06: the x3 weights over-sharpen, and the
# expected worst-case choice among full and half strength never lost, mean +1.43 dB, against
# +1.11 with 3 of 54 cases below -0.1 dB for full strength only).  x4 keeps its table.
VOLUME_RESIDUAL_SCALES: dict[int, tuple[float, ...]] = {3: (0.5,)}


# The other learned models, run with their nominal weights when ``--models`` names them.
OTHER_MODELS = ("srcnn", "residual", "srgan")


def weights_groups(scale: int) -> list[str]:
    """Slice-mode weights groups with a shipped file: the family groups and the hedging weights."""
    return [g for g in (*INPLANE_GROUPS, "blind", "hedge")
            if find_weights("fast", "slice", scale, None, g).is_file()]


def low_resolution_slices(vol: np.ndarray, modality: str, scale: int,
                          deg: Degradation | Operator) -> tuple[np.ndarray, np.ndarray]:
    """Slices cropped to a multiple of ``scale`` and their in-plane degradation: (truth, input).

    ``deg`` is a family member or an operator outside every family (:mod:`sr_engine.stress`),
    applied in network units alike.
    """
    h, w = (vol.shape[1] // scale) * scale, (vol.shape[2] // scale) * scale
    hr = np.ascontiguousarray(vol[:, :h, :w])
    return hr, degrade_series(hr, modality, deg, scale, axis_last=False)


def slice_case(name: str, vol: np.ndarray, spacing: tuple[float, float, float], modality: str,
               scale: int, label: str, deg: Degradation | Operator, held_out: bool,
               cross: bool = False, models: Sequence[str] = (),
               residual_scales: Sequence[float] = ()) -> dict:
    """One slice-mode case: degrade, run every contender, score.

    With ``cross`` (validation), also the gain of every weights group (:func:`weights_groups`)
    under ``groups``, from which :func:`gain_table` builds the selection table; with
    ``residual_scales`` also of each group with its residual scaled (``group@alpha``).
    """
    hr, lr = low_resolution_slices(vol, modality, scale, deg)
    sp = (spacing[0], spacing[1] * scale, spacing[2] * scale)
    group = inplane_group(deg) if isinstance(deg, Degradation) else "unseen"
    row: dict = {"case": name, "modality": modality, "scale": scale, "degradation": label,
                 "held_out": held_out, "true_group": group}
    off = {"estimate_degradation": False}
    row["interp"], _ = _run(lr, sp, spacing[0], modality,
                            EnhanceRequest(scale=scale, model="bicubic", **off), hr)
    row["fast_nominal"], _ = _run(lr, sp, spacing[0], modality,
                                  EnhanceRequest(scale=scale, model="fast", **off), hr)
    for m in models:  # every other model with its nominal weights, as named by a rule
        row[f"{m}_nominal"], _ = _run(lr, sp, spacing[0], modality,
                                      EnhanceRequest(scale=scale, model=m, **off), hr)
    if group != "unseen" and find_weights("fast", "slice", scale, None, group).is_file():
        row["fast_oracle"] = _oracle(lr, sp, spacing[0], modality, "slice", scale, group, hr)
    if cross:
        row["groups"] = {
            key: _oracle(lr, sp, spacing[0], modality, "slice", scale, key, hr) - row["interp"]
            for g in weights_groups(scale)
            for key in (g, *(f"{g}@{a:g}" for a in residual_scales))}
        row["groups"]["nominal"] = row["fast_nominal"] - row["interp"]
        for kernel in INTERPOLATION_CANDIDATES:  # e.g. lanczos3@0.5, as the node runs it
            row["groups"][kernel] = _oracle(lr, sp, spacing[0], modality, "slice", scale,
                                            kernel, hr) - row["interp"]
    row["node"], res = _run(lr, sp, spacing[0], modality, EnhanceRequest(scale=scale), hr)
    row["node_model"] = res.model_name + (f"[{res.extra.get('weights_group')}]"
                                          if res.extra.get("weights_group") else "")
    row["estimate"] = res.degradation.as_dict() if res.degradation else None
    row["fallback_reason"] = res.fallback_reason
    row["node_seconds"] = round(res.seconds, 3)
    return row


def gain_table(rows: list[dict], scale: int, minimax: bool = True) -> dict[str, object]:
    """Selection table of the slice-mode weights groups from validation rows.

    ``"mean"`` / ``"min"``: mean and worst gain (dB over interpolation) of each weights group's
    file under each *true* group over the validation cases (sharp and smooth-HR images).
    ``"by_estimate"``: worst gain of each weights group over the cases the estimator put in each
    cell ``"<estimated group>|<confidence bin>"`` (bins split at :data:`CONFIDENCE_BINS`), with
    ``"cases"`` per cell: the node uses the best group of its cell when that worst case is above
    :data:`sr_engine.estimate.MIN_EXPECTED_GAIN_DB` (minimax under the estimator's confusion,
    see ``sr_engine.estimate.slice_weights_choice``).  ``minimax=False``: the previous table,
    ``"mean"`` and ``"min"`` of the family weights only (the node then takes the best expected
    worst-case gain from the class probabilities).
    """
    from sr_engine.estimate import estimate_cell

    sel = [r for r in rows if r["scale"] == scale and "groups" in r]
    groups = list(dict.fromkeys(g for r in sel for g in r["groups"]
                                if minimax or g in INPLANE_GROUPS))
    table: dict[str, dict[str, dict[str, float]]] = {"mean": {}, "min": {}, "by_estimate": {}}
    cells: dict[str, list[dict]] = {}
    for r in sel:
        cell = estimate_cell(r.get("estimate") or {}, CONFIDENCE_BINS)
        if cell is not None:
            cells.setdefault(cell, []).append(r)
    for g in groups:
        for key in table:
            table[key][g] = {}
        for t in INPLANE_GROUPS:
            vals = [r["groups"][g] for r in sel if r["true_group"] == t]
            table["mean"][g][t] = round(float(np.mean(vals)), 3) if vals else 0.0
            table["min"][g][t] = round(float(np.min(vals)), 3) if vals else 0.0
        if not minimax:
            continue
        for cell, members in sorted(cells.items()):
            table["by_estimate"][g][cell] = round(float(min(r["groups"][g] for r in members)),
                                                  3)
    if not minimax:
        return {"mean": table["mean"], "min": table["min"]}
    noises = [float(((r.get("estimate") or {}).get("parameters") or {}).get("noise", 0.0))
              for r in sel]
    return {**table, "confidence_bins": list(CONFIDENCE_BINS),
            "cases": {cell: len(members) for cell, members in sorted(cells.items())},
            # the noisiest validation input: interpolation candidates are not used beyond it
            "max_noise": round(max(noises), 5) if noises else 0.0}


#: Confidence bins of the selection cells (chosen on the validation set, leave-one-volume-out:
#: one split at 0.8 kept every case above -0.1 dB with the best mean; finer bins overfit).
CONFIDENCE_BINS = (0.8,)


def simulate_choice(rows: list[dict], table: dict, scale: int) -> list[float]:
    """Gain of the node's slice-mode choice on validation rows under a selection ``table``.

    Reproduces ``sr_engine.estimate.slice_weights_choice`` from the recorded estimate and the
    recorded gain of every weights group (0 for the interpolation fallback).
    """
    from sr_engine.estimate import (
        MIN_CELL_WORST_DB,
        MIN_CONFIDENCE,
        choose_from_table,
        choose_guarded,
        choose_interpolation,
        learned_part,
    )

    out = []
    for r in rows:
        if r["scale"] != scale or "groups" not in r:
            continue
        est = r.get("estimate") or {}
        floor = 0.0
        if not est.get("in_family"):
            pick = None
        elif table.get("guard"):  # the expected-worst-case rule keeps its confidence threshold
            pick = (choose_guarded(est, table)
                    if float(est.get("confidence", 0.0)) >= MIN_CONFIDENCE else None)
        else:
            pick = choose_from_table(est, learned_part(table))
            floor = MIN_CELL_WORST_DB
        if est.get("in_family") and not (pick and pick[1] > floor):
            # no learned weights kept: the cell's safest interpolation kernel, if safe enough
            kernel = choose_interpolation(est, table.get("guard") or table)
            if kernel is not None:
                pick, floor = kernel, -99.0
        out.append(r["groups"][pick[0]] if pick and pick[0] in r["groups"]
                   and pick[1] > floor else 0.0)
    return out


def guarded_table(rows: list[dict], scale: int) -> dict[str, object]:
    """The expected-worst-case table of the sharp images plus the cell table as its guard.

    See ``sr_engine.estimate.choose_guarded``: weights are used only when the pick of the
    previous rule (``mean``/``min`` over sharp validation images) also has a positive worst
    case in its estimate cell over sharp and smooth-at-native-resolution images.
    """
    sharp = [r for r in rows if r["case"].endswith("| sharp")]
    cells = gain_table(rows, scale)
    return {**gain_table(sharp, scale, minimax=False),
            "guard": {k: cells[k] for k in ("by_estimate", "confidence_bins", "cases",
                                            "max_noise")}}


def leave_one_out(rows: list[dict], scale: int,
                  build: Callable[[list[dict], int], dict] = gain_table) -> dict[str, float]:
    """Node gain per validation case when the table is built without that case's volume."""
    out: dict[str, float] = {}
    for b in sorted({r["case"].split(" | ")[0] for r in rows}):
        test = [r for r in rows if r["case"].split(" | ")[0] == b and r["scale"] == scale
                and "groups" in r]
        train = [r for r in rows if r["case"].split(" | ")[0] != b]
        for r, g in zip(test, simulate_choice(test, build(train, scale), scale),
                        strict=True):
            out[f"{r['case']} {r['degradation']}"] = g
    return out


def _oracle(lr: np.ndarray, sp: tuple[float, float, float], thickness: float, modality: str,
            mode: str, scale: int, group: str, hr: np.ndarray) -> float:
    """``fast`` with the weights of the true family group (what a perfect estimate would pick).

    ``group`` may also be a slice-mode interpolation candidate (``lanczos3@0.5``), run as the
    node runs it when a selection table picks it.
    """
    from sr_engine import inference

    kernel = group in INTERPOLATION_CANDIDATES
    est = inference.DegradationEstimate(INPLANE_GROUPS[0] if kernel else group, {}, 1.0, True,
                                        mode)
    saved = (inference.estimate_inplane, inference.estimate_slab,
             inference.slice_weights_choice, inference.volume_weights_choice)
    inference.estimate_inplane = lambda *a, **k: est  # type: ignore[assignment]
    inference.estimate_slab = lambda *a, **k: est  # type: ignore[assignment]
    inference.slice_weights_choice = (  # type: ignore[assignment]
        lambda *a, **k: (group, 1.0, True) if kernel else None)
    # without this the volume x4 table (which picks the nominal weights) would answer for
    # every group, and every "group" column would be the nominal weights' gain
    inference.volume_weights_choice = lambda *a, **k: None  # type: ignore[assignment]
    try:
        score, _ = _run(lr, sp, thickness, modality,
                        EnhanceRequest(mode=mode, scale=scale), hr)  # type: ignore[arg-type]
    finally:
        (inference.estimate_inplane, inference.estimate_slab,
         inference.slice_weights_choice, inference.volume_weights_choice) = saved
    return score


def runs_volume_case(orientation: str, scale: int, label: str) -> bool:
    """Whether the benchmark runs this MNI152 case: every profile axial, two profiles x4
    coronal and sagittal."""
    return orientation == "axial" or (scale == 4 and label in ("box 1.0", "gauss 1.0"))


def thick_case(vol: np.ndarray, spacing: tuple[float, float, float], scale: int,
               deg: Degradation, orientation: str
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """MNI152 with thick slices along ``orientation``: (truth, thick volume, thick spacing)."""
    axes = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}[orientation]
    v = np.ascontiguousarray(vol.transpose(axes))
    sp = tuple(spacing[a] for a in axes)
    z = (v.shape[0] // scale) * scale
    hr = v[:z]
    return hr, degrade_series(hr, "MR", deg, scale, axis_last=True), (sp[0] * scale, sp[1], sp[2])


def volume_case(vol: np.ndarray, spacing: tuple[float, float, float], scale: int, label: str,
                deg: Degradation, held_out: bool, orientation: str,
                adapt_seconds: float, oracle: bool = False,
                keeps: Sequence[float] = (), models: Sequence[str] = ()) -> dict:
    """One volume-mode case on MNI152: thick slices along ``orientation``."""
    hr, lr, lsp = thick_case(vol, spacing, scale, deg, orientation)
    thick = lsp[0]  # the header states contiguous slices; the true profile is for the estimate
    row: dict = {"case": f"MNI152 {orientation}", "modality": "MR", "scale": scale,
                 "degradation": label, "held_out": held_out, "true_group": deg.family}
    off = {"mode": "volume", "scale": scale, "estimate_degradation": False}
    row["interp"], _ = _run(lr, lsp, thick, "MR", EnhanceRequest(model="cubic", **off), hr)
    # the issue states the volume goals over linear interpolation; cubic is the stricter one
    row["linear"], _ = _run(lr, lsp, thick, "MR", EnhanceRequest(model="linear", **off), hr)
    row["fast_nominal"], _ = _run(lr, lsp, thick, "MR", EnhanceRequest(model="fast", **off), hr)
    for m in models:
        row[f"{m}_nominal"], _ = _run(lr, lsp, thick, "MR", EnhanceRequest(model=m, **off), hr)
    if oracle and find_weights("fast", "volume", scale, None, deg.family).is_file():
        row["fast_oracle"] = _oracle(lr, lsp, thick, "MR", "volume", scale, deg.family, hr)
    row["node"], res = _run(lr, lsp, thick, "MR", EnhanceRequest(mode="volume", scale=scale), hr)
    row["node_model"] = res.model_name + (f"[{res.extra.get('weights_group')}]"
                                          if res.extra.get("weights_group") else "")
    row["estimate"] = res.degradation.as_dict() if res.degradation else None
    row["fallback_reason"] = res.fallback_reason
    row["node_seconds"] = round(res.seconds, 2)
    if adapt_seconds > 0 and keeps:
        # one adaptation, scored with each share of the fine-tune kept (ADAPT_KEEP: "adapted")
        request = EnhanceRequest(mode="volume", scale=scale, adapt_seconds=adapt_seconds)
        scores, row["adaptation"] = run_adapted_keeps(lr, lsp, thick, "MR", request, hr,
                                                      sorted({*keeps, ADAPT_KEEP}))
        row["adapted"] = scores[ADAPT_KEEP]
        for k, score in scores.items():
            row[f"adapted@{k:g}"] = score
    elif adapt_seconds > 0:
        row["adapted"], ares = _run(lr, lsp, thick, "MR",
                                    EnhanceRequest(mode="volume", scale=scale,
                                                   adapt_seconds=adapt_seconds), hr)
        row["adaptation"] = ares.adaptation
    return row


def _print(row: dict) -> None:
    base = row["interp"]
    cells = [f"{row['case'][:16]:16} x{row['scale']} {row['degradation'][:18]:18}"
             f"{'*' if row['held_out'] else ' '} interp {base:6.2f}"]
    for k in ("fast_nominal", *(f"{m}_nominal" for m in OTHER_MODELS), "fast_oracle", "node",
              "adapted",
              *sorted((k for k in row if k.startswith("adapted@")), reverse=True)):
        if k in row:
            cells.append(f"{k} {row[k] - base:+6.2f}")
    est = row["estimate"] or {}
    cells.append(f"est {est.get('family', '-')}/{est.get('confidence', 0):.2f} -> "
                 f"{row['node_model']}")
    print("  ".join(cells), flush=True)


def _task_key(row: dict) -> str:
    return f"{'volume' if row['case'].startswith('MNI') else 'slice'} x{row['scale']}"


def summarise(rows: list[dict]) -> dict:
    """Mean / min gain of the node's choice over interpolation per task and split."""
    out = {}
    for task in sorted({_task_key(r) for r in rows}, key=lambda t: (t.startswith("volume"),
                                                                  int(t.rpartition("x")[2]))):
        for held in (False, True):
            sel = [r for r in rows if _task_key(r) == task and r["held_out"] == held]
            if not sel:
                continue
            key = f"{task} {'held-out' if held else 'train'}"
            g = [r["node"] - r["interp"] for r in sel]
            entry = {"cases": len(sel), "node_mean_gain": round(float(np.mean(g)), 3),
                     "node_min_gain": round(float(np.min(g)), 3),
                     "nominal_mean_gain": round(float(np.mean(
                         [r["fast_nominal"] - r["interp"] for r in sel])), 3),
                     "fallbacks": sum(1 for r in sel if r["fallback_reason"])}
            if all("adapted" in r for r in sel):
                entry["adapted_mean_gain"] = round(float(np.mean(
                    [r["adapted"] - r["interp"] for r in sel])), 3)
            for m in OTHER_MODELS:
                if all(f"{m}_nominal" in r for r in sel):
                    gm = [r[f"{m}_nominal"] - r["interp"] for r in sel]
                    entry[f"{m}_mean_gain"] = round(float(np.mean(gm)), 3)
                    entry[f"{m}_min_gain"] = round(float(np.min(gm)), 3)
            if all("fast_oracle" in r for r in sel):
                # upper bounds no node can reach: the true family's weights, and the best of
                # interpolation, nominal and true-family weights chosen per case with the truth
                entry["oracle_mean_gain"] = round(float(np.mean(
                    [r["fast_oracle"] - r["interp"] for r in sel])), 3)
                entry["best_of_mean_gain"] = round(float(np.mean(
                    [max(r["fast_oracle"], r["fast_nominal"], r["interp"]) - r["interp"]
                     for r in sel])), 3)
            if all("linear" in r for r in sel):
                entry["interp_over_linear"] = round(float(np.mean(
                    [r["interp"] - r["linear"] for r in sel])), 3)
            out[key] = entry
    return out


#: CT and MR phantom volumes (each) of the slice-mode validation set.  5 since 2026-12-06 (3
#: before: cells of 8-14 cases kept learned weights whose worst case was an optimistic bound;
#: ``eval_unseen`` found them losing up to 0.22 dB on a public image under an edge-enhancing CT
#: kernel and MR partial Fourier).  The first 3 of each are the volumes used before.
SLICE_VALIDATION_VOLUMES = 5


def _slice_cases(validation: bool, smooth: bool = True
                 ) -> list[tuple[str, np.ndarray, tuple[float, float, float], str]]:
    """Public images, or the validation phantoms (also smooth at their own matrix)."""
    if not validation:
        return [load_dicom_case(f) for f in SLICE_FILES]
    from sr_engine.data import validation_volumes

    cases = []
    for n, v, s, m in validation_volumes(SLICE_VALIDATION_VOLUMES, (96, 160, 160)):
        v = np.ascontiguousarray(v[::8])
        cases.append((f"{n} | sharp", v, s, m))
        if not smooth:
            continue
        mapping = mapping_for(v, m)
        x = mapping.forward(v)
        rng = np.random.default_rng(len(cases))
        for label, kind, amount, window, noise in SMOOTH_HR_VARIANTS:
            sm = np.stack([smooth_hr(img, kind, amount, window, noise, rng) for img in x])
            # Reconstructions are never below the original floor (magnitude MR, CT air).
            sm = np.maximum(mapping.inverse(sm), float(v.min())).astype(np.float32)
            cases.append((f"{n} | {label}", sm, s, m))
    return cases


def volume_validation(scale: int) -> dict[str, dict[str, dict[str, float]]]:
    """Gains of the nominal and of each profile's weights on the synthetic validation volumes.

    Returns ``{"mean"|"min": {weights: {true profile: gain over cubic}}}`` (training-split
    profiles only; weights ``nominal``, ``box``, ``gaussian``, ``sinc`` and, for the scales of
    :data:`VOLUME_RESIDUAL_SCALES`, each profile's weights at that residual scale).
    """
    from sr_engine.data import validation_volumes

    halves = VOLUME_RESIDUAL_SCALES.get(scale, ())
    weights = ["nominal", *SLAB_PROFILES, *(f"{p}@{a:g}" for a in halves for p in SLAB_PROFILES)]
    gains: dict[tuple[str, str], list[float]] = {}
    for name, vol, spacing, modality in validation_volumes(3, (96, 128, 128)):
        for label, deg, held in SLAB_DEGRADATIONS:
            if held:
                continue
            lr = degrade_series(vol, modality, deg, scale, axis_last=True)
            lsp = (spacing[0] * scale, spacing[1], spacing[2])
            off = {"mode": "volume", "scale": scale, "estimate_degradation": False}
            base, _ = _run(lr, lsp, lsp[0], modality, EnhanceRequest(model="cubic", **off), vol)
            for w in weights:
                if w == "nominal":
                    score, _ = _run(lr, lsp, lsp[0], modality,
                                    EnhanceRequest(model="fast", **off), vol)
                else:
                    score = _oracle(lr, lsp, lsp[0], modality, "volume", scale, w, vol)
                gains.setdefault((w, deg.family), []).append(score - base)
            print(name, label, {w: round(gains[(w, deg.family)][-1], 2) for w in weights},
                  flush=True)
    return {key: {w: {t: round(float(agg(gains[(w, t)])), 3) for t in SLAB_PROFILES}
                  for w in weights} for key, agg in (("mean", np.mean), ("min", np.min))}


def markdown(rows: list[dict]) -> str:
    """Markdown tables: per task and degradation (over images) and per case."""
    others = [m for m in OTHER_MODELS if any(f"{m}_nominal" in r for r in rows)]
    other_head = f" {' / '.join(others)} nominal |" if others else ""
    lines = ["| task | degradation | held out | interp PSNR (mean) | fast nominal |" + other_head
             + " node's choice (mean / worst) | adapted | fallbacks | node's weights |",
             "|---|---|---|---|---|" + ("---|" if others else "") + "---|---|---|---|"]
    keys = dict.fromkeys((r["case"].startswith("MNI"), r["scale"], r["degradation"],
                          r["case"] if r["case"].startswith("MNI") else "") for r in rows)
    for vol, scale, label, case in keys:
        sel = [r for r in rows if (r["case"].startswith("MNI"), r["scale"], r["degradation"]) ==
               (vol, scale, label) and (not vol or r["case"] == case)]
        g = [r["node"] - r["interp"] for r in sel]
        nom = np.mean([r["fast_nominal"] - r["interp"] for r in sel])
        ad = [r["adapted"] - r["interp"] for r in sel if "adapted" in r]
        task = f"{case or 'slice'} x{scale}"
        picks = ", ".join(sorted({r["node_model"] for r in sel}))
        other = " / ".join(
            f"{np.mean([r[f'{m}_nominal'] - r['interp'] for r in sel]):+.2f}"
            if all(f"{m}_nominal" in r for r in sel) else "-" for m in others)
        lines.append(f"| {task} | {label} | {'yes' if sel[0]['held_out'] else ''} | "
                     f"{np.mean([r['interp'] for r in sel]):.2f} | {nom:+.2f} | "
                     + (f"{other} | " if others else "")
                     + f"{np.mean(g):+.2f} / {min(g):+.2f} | "
                     f"{f'{np.mean(ad):+.2f}' if ad else '-'} | "
                     f"{sum(1 for r in sel if r['fallback_reason'])}/{len(sel)} | {picks} |")
    if others:
        lines += ["", "Every model with its nominal weights (mean / worst gain over "
                  "interpolation, dB), and the node's choice:", "",
                  "| task | split | fast | " + " | ".join(others) + " | node's choice |",
                  "|---|---|---|" + "---|" * len(others) + "---|"]
        for key in summarise(rows):
            task, _, split = key.rpartition(" ")
            sel = [r for r in rows if _task_key(r) == task and r["held_out"] == (
                split == "held-out")]
            cells = []
            for col in ("fast_nominal", *(f"{m}_nominal" for m in others), "node"):
                g = [r[col] - r["interp"] for r in sel if col in r]
                cells.append(f"{np.mean(g):+.2f} / {min(g):+.2f}" if g else "-")
            lines.append(f"| {task} | {split} | " + " | ".join(cells) + " |")
    lines += ["", "Per case (PSNR gain over interpolation, dB; estimate family/confidence):", "",
              "| case | task | degradation | interp PSNR | fast nominal |" + other_head
              + " node's choice | estimate | adapted |",
              "|---|---|---|---|---|" + ("---|" if others else "") + "---|---|---|"]
    for r in rows:
        est = r["estimate"] or {}
        ad = f"{r['adapted'] - r['interp']:+.2f}" if "adapted" in r else "-"
        other = " / ".join(f"{r[f'{m}_nominal'] - r['interp']:+.2f}" if f"{m}_nominal" in r
                           else "-" for m in others)
        lines.append(f"| {r['case']} | x{r['scale']} | {r['degradation']}"
                     f"{' (held out)' if r['held_out'] else ''} | {r['interp']:.2f} | "
                     f"{r['fast_nominal'] - r['interp']:+.2f} | "
                     + (f"{other} | " if others else "")
                     + f"{r['node'] - r['interp']:+.2f} "
                     f"{r['node_model']} | {est.get('family', '-')}/"
                     f"{est.get('confidence', 0):.2f} | {ad} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["slice:2", "slice:4", "volume:2", "volume:4"])
    ap.add_argument("--adapt-seconds", type=float, default=20.0,
                    help="volume x4: also run the node's choice with this adaptation")
    ap.add_argument("--keeps", nargs="+", type=float, default=[],
                    help="volume x4: also score these shares of the fine-tune kept "
                         "(columns adapted@keep; one adaptation per case)")
    ap.add_argument("--orientations", nargs="+", default=["axial", "coronal", "sagittal"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(OTHER_MODELS), choices=OTHER_MODELS,
                    help="other models run with their nominal weights per case (fast always "
                         "runs); none: --models with no name")
    ap.add_argument("--oracle", action="store_true",
                    help="volume mode: also run fast with the true profile's weights")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--validation", action="store_true",
                    help="slice tasks on the held-out synthetic phantoms (sr_engine.data."
                    "validation_volumes), training-split degradations only: the set on which "
                    "thresholds are chosen")
    ap.add_argument("--stress", action="store_true",
                    help="with --validation: also the operators outside every family of "
                    "VALIDATION_STRESS, so that the selection tables guard against them")
    ap.add_argument("--guarded-rule", type=int, nargs="*", default=[],
                    help="with --validation: slice scales whose table is the previous rule's "
                         "guarded by the estimate cells (sr_engine.estimate.choose_guarded)")
    ap.add_argument("--previous-rule", type=int, nargs="*", default=[],
                    help="slice scales whose table keeps the previous rule (sharp validation "
                    "images, mean/min of the family weights, expected worst-case choice): x4, "
                    "where the minimax table measured worse (README)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only merge these result files into --out (and its .md)")
    args = ap.parse_args()
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(f.read_text())["rows"]]
        out = args.out or RESULTS / "eval_robust.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "summary": summarise(rows)}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows))
        for k, v in summarise(rows).items():
            print(f"  {k:22} {v}")
        return
    args.out = args.out or RESULTS / ("eval_robust_validation.json" if args.validation
                                      else "eval_robust.json")
    if args.validation and any(t.startswith("volume") for t in args.tasks):
        from sr_engine.estimate import volume_selection_path

        for task in args.tasks:
            mode, scale = task.split(":")
            if mode == "volume":
                table = volume_validation(int(scale))
                volume_selection_path(int(scale)).write_text(
                    json.dumps(table, indent=1, sort_keys=True))
                print(f"volume x{scale} table (weights -> true profile):", table)
        args.tasks = [t for t in args.tasks if t.startswith("slice")]
        if not args.tasks:
            return
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for task in args.tasks:
        mode, scale = task.split(":")
        if mode == "slice":
            previous = int(scale) in args.previous_rule
            stress = [(label, op, False) for label, op in VALIDATION_STRESS
                      if args.validation and args.stress]
            for name, vol, spacing, modality in _slice_cases(args.validation, not previous):
                for label, deg, held in [*SLICE_DEGRADATIONS, *stress]:
                    if args.validation and held:
                        continue
                    row = slice_case(name, vol, spacing, modality, int(scale), label, deg, held,
                                     cross=args.validation,
                                     models=() if args.validation else args.models,
                                     residual_scales=RESIDUAL_SCALES
                                     if args.validation and int(scale) == 2 else ())
                    rows.append(row)
                    _print(row)
        else:
            _, vol, spacing, _ = load_mni_case()
            for orientation in args.orientations:
                for label, deg, held in SLAB_DEGRADATIONS:
                    if not runs_volume_case(orientation, int(scale), label):
                        continue
                    adapt = args.adapt_seconds if int(scale) == 4 else 0.0
                    row = volume_case(vol, spacing, int(scale), label, deg, held, orientation,
                                      adapt, args.oracle, args.keeps, args.models)
                    rows.append(row)
                    _print(row)
    summary = summarise(rows)
    if args.validation:
        from sr_engine.estimate import gains_path

        for task in args.tasks:
            mode, scale = task.split(":")
            if mode == "slice":
                guarded = int(scale) in args.guarded_rule
                build = guarded_table if guarded else gain_table
                table = (build(rows, int(scale)) if int(scale) not in args.previous_rule
                         else gain_table(rows, int(scale), False))
                gains_path(int(scale)).write_text(json.dumps(table, indent=1, sort_keys=True))
                print(f"gain table x{scale} (weights group -> true group):", table)
                if int(scale) in args.previous_rule:
                    continue
                loo = leave_one_out(rows, int(scale), build)
                for split, keep in (("sharp HR", lambda c: c.endswith("| sharp")),
                                    ("smooth HR", lambda c: not c.endswith("| sharp"))):
                    sel = [r for r in rows if keep(r["case"]) and r["scale"] == int(scale)]
                    for how, g in (("in-sample", simulate_choice(sel, table, int(scale))),
                                   ("leave-one-volume-out",
                                    [loo[f"{r['case']} {r['degradation']}"] for r in sel])):
                        if g:
                            print(f"  node x{scale} {split} {how}: mean {np.mean(g):+.2f} worst "
                                  f"{np.min(g):+.2f} below -0.1: {sum(x < -0.1 for x in g)}"
                                  f"/{len(g)}")
    print("summary (gain over interpolation, dB):")
    for k, v in summary.items():
        print(f"  {k:22} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows))
    args.out.write_text(json.dumps({"rows": rows, "summary": summary,
                                    "wall_seconds": round(time.perf_counter() - t0, 1)},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
