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
    if args.write:
        GUARD_FILE.write_text(json.dumps({
            "about": "gain (dB) over interpolation on the guard phantoms of "
                     "benchmarks/weights_guard.py (seed 90210, nominal degradation, no "
                     "self-ensemble); tests/test_engine_shipped.py allows a drop of "
                     f"{MARGIN_DB} dB",
            "gain_db": figures}, indent=2) + "\n")
        print(f"written {Path(GUARD_FILE).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
