"""Regression guard of the shipped weights: the gain of every nominal weights file over its
interpolation baseline on fixed held-out phantoms (nominal degradation, explicit model, no
estimate, no self-ensemble), written to ``sr_engine/weights/guard.json``.

``tests/test_engine_shipped.py`` recomputes each figure and fails when one drops more than
:data:`MARGIN_DB` below the recorded value (a weakened, negated or swapped weights file).
Re-record after retraining on purpose: ``.venv/bin/python -m benchmarks.weights_guard --write``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sr_engine.data import validation_volumes
from sr_engine.degrade import Degradation, apply_inplane, apply_throughplane
from sr_engine.evaluation import evaluate_volumes
from sr_engine.models import WEIGHTS_DIR
from sr_engine.tasks import LEARNED_MODELS, SCALES

GUARD_FILE = WEIGHTS_DIR / "guard.json"
#: Allowed drop below the recorded gain (dB).
MARGIN_DB = 0.3
#: Guard phantoms: one CT-like and one MR-like held-out volume, seed 90210 (disjoint from the
#: training seeds and from the validation seed used for decisions).
GUARD_SEED = 90210
GUARD_SHAPE = (24, 96, 96)


def guard_cases() -> list[tuple[str, np.ndarray, tuple[float, float, float], str]]:
    """The fixed held-out phantoms the guard measures on."""
    return validation_volumes(count=1, shape=GUARD_SHAPE, seed=GUARD_SEED)


def measure(model: str, mode: str, scale: int) -> float:
    """Mean PSNR gain (dB) of ``model`` over the baseline on the guard phantoms."""
    torch.manual_seed(0)
    report = evaluate_volumes(guard_cases(), mode, scale, model, self_ensemble=False)
    return float(report["mean_psnr_gain_db"])


#: Degradation each family / hedging weights file is guarded on (a member of its training set).
GROUP_DEGRADATIONS: dict[str, Degradation] = {
    "area_sharp": Degradation.of("area", sigma_n=0.15),
    "area_soft": Degradation.of("area", sigma_n=0.5),
    "lanczos": Degradation.of("lanczos", lobes=3),
    "kspace_sharp": Degradation.of("kspace", window=0),
    "kspace_smooth": Degradation.of("kspace", window=1),
    "blind": Degradation.of("area", sigma_n=0.3),
    "hedge": Degradation.of("lanczos", lobes=3),
    "box": Degradation.of("box", fwhm=1.0),
    "gaussian": Degradation.of("gaussian", fwhm=1.0),
    "sinc": Degradation.of("sinc", fwhm=1.0),
}


def group_files() -> list[tuple[str, int, str]]:
    """Every shipped ``fast`` family / hedging weights file as ``(mode, scale, group)``."""
    out = []
    for path in sorted(WEIGHTS_DIR.glob("fast_*_x*_*.safetensors")):
        _, mode, scale, group = path.stem.split("_", 3)
        out.append((mode, int(scale[1:]), group))
    return out


def measure_group(mode: str, scale: int, group: str) -> float:
    """Mean PSNR gain (dB, network units) of ``fast`` family weights over the interpolated base
    on the guard phantoms degraded with :data:`GROUP_DEGRADATIONS` (network only, no estimate)."""
    from sr_engine.models import load_model
    from sr_engine.models.base import interpolate
    from sr_engine.normalise import mapping_for

    torch.manual_seed(0)
    net, _ = load_model("fast", mode, scale, None, group)
    deg = GROUP_DEGRADATIONS[group]
    gains = []
    for _, vol, _, modality in guard_cases():
        x = torch.from_numpy(mapping_for(vol, modality).forward(vol)).unsqueeze(1)
        if mode == "volume":  # planes whose H axis is z
            x = x.squeeze(1).permute(2, 0, 1).unsqueeze(1).contiguous()
        with torch.inference_mode():
            if mode == "slice":
                lr = apply_inplane(x, scale, deg, torch.Generator().manual_seed(0))
                fy, fx = scale, scale
            else:
                lr = apply_throughplane(x, scale, deg)
                fy, fx = scale, 1
            out, base = net(lr), interpolate(lr, fy, fx)
        b = (4 if mode == "slice" else 2) * scale  # volume: only 24 slices along H
        sl = (..., slice(b, -b), slice(b if fx > 1 else 0, -b if fx > 1 else None))
        mse_o = float(torch.mean((out[sl] - x[sl]) ** 2))
        mse_b = float(torch.mean((base[sl] - x[sl]) ** 2))
        gains.append(10 * np.log10(mse_b / mse_o))
    return float(np.mean(gains))


def all_tasks() -> list[tuple[str, str, int]]:
    """Every shipped nominal weights file as ``(model, mode, scale)``."""
    return [(m, mode, s) for m in LEARNED_MODELS for mode, scales in SCALES.items()
            for s in scales]


def main(argv: list[str] | None = None) -> int:
    """Print the guard figures; with ``--write`` record them in ``guard.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the figures in guard.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = {}
    for model, mode, scale in all_tasks():
        key = f"{model}_{mode}_x{scale}"
        figures[key] = round(measure(model, mode, scale), 3)
        print(f"{key:<24} {figures[key]:+.3f} dB", flush=True)
    groups = {}
    for mode, scale, group in group_files():
        key = f"fast_{mode}_x{scale}_{group}"
        groups[key] = round(measure_group(mode, scale, group), 3)
        print(f"{key:<24} {groups[key]:+.3f} dB ({GROUP_DEGRADATIONS[group].label()})",
              flush=True)
    if args.write:
        GUARD_FILE.write_text(json.dumps({
            "about": "gain (dB) over interpolation on the guard phantoms of "
                     "benchmarks/weights_guard.py (seed 90210, nominal degradation, no "
                     "self-ensemble); tests/test_engine_shipped.py allows a drop of "
                     f"{MARGIN_DB} dB",
            "gain_db": figures,
            "group_about": "family / hedging fast weights: gain (dB, network units) over the "
                           "interpolated base on the same phantoms degraded with "
                           "benchmarks.weights_guard.GROUP_DEGRADATIONS",
            "group_gain_db": groups}, indent=2) + "\n")
        print(f"written {Path(GUARD_FILE).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
