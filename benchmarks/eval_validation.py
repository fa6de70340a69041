"""Held-out validation of the SR engine: synthetic 3-D CT- and MR-like phantom volumes.

This is the set on which training and inference decisions are taken (how long to train,
whether the self-ensemble helps), so that the public benchmark (``eval_public.py``, MNI152 and
pydicom-data) stays a one-shot measurement.  The volumes come from
:func:`sr_engine.data.validation_volumes`: 3-D phantoms (training only ever sees 2-D images:
natural images and 2-D phantoms) generated with a seed disjoint from the training seeds.

Usage: .venv/bin/python -m benchmarks.eval_validation [--models fast residual srgan]
       [--tasks volume:4] [--self-ensemble both|on|off] [--weights-dir DIR] [--threads 1]

Prints a table and writes benchmarks/results/eval_validation.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sr_engine.data import validation_volumes
from sr_engine.evaluation import evaluate_volumes

RESULTS = Path(__file__).resolve().parent / "results"


def run(models: list[str], tasks: list[str], ensembles: list[bool], count: int,
        weights_dir: Path | None) -> list[dict]:
    """Evaluate every model, task and self-ensemble setting on the validation volumes.

    Parameters
    ----------
    models
        Registry names.
    tasks
        ``mode:scale`` strings.
    ensembles
        Self-ensemble settings to measure.
    count
        CT and MR volumes each.
    weights_dir
        Folder searched first for weights.

    Returns
    -------
    list of dict
        One :func:`sr_engine.evaluation.evaluate_volumes` report per combination (with
        ``wall_seconds`` added).
    """
    cases = validation_volumes(count)
    results = []
    print(f"{'task':10} {'model':9} {'ens':3} {'PSNR gain dB':>12} {'CT':>6} {'MR':>6}"
          f" {'SSIM gain':>9} {'s':>6}  per-case gains")
    for task in tasks:
        mode, scale = task.split(":")
        for model in models:
            for ens in ensembles:
                t0 = time.perf_counter()
                res = evaluate_volumes(cases, mode, int(scale), model, weights_dir=weights_dir,
                                       self_ensemble=ens)
                res["wall_seconds"] = round(time.perf_counter() - t0, 1)
                gains = {c["name"]: c["psnr"] - c["psnr_baseline"] for c in res["cases"]}
                ct = [g for n, g in gains.items() if "_ct_" in n]
                mr = [g for n, g in gains.items() if "_mr_" in n]
                res["mean_psnr_gain_ct_db"] = round(sum(ct) / max(len(ct), 1), 3)
                res["mean_psnr_gain_mr_db"] = round(sum(mr) / max(len(mr), 1), 3)
                results.append(res)
                print(f"{task:10} {model:9} {'on' if ens else 'off':3}"
                      f" {res['mean_psnr_gain_db']:12.3f} {res['mean_psnr_gain_ct_db']:6.2f}"
                      f" {res['mean_psnr_gain_mr_db']:6.2f} {res['mean_ssim_gain']:9.4f}"
                      f" {res['wall_seconds']:6.1f}  "
                      + " ".join(f"{n[4:]}={g:+.2f}" for n, g in gains.items()), flush=True)
    return results


def main() -> None:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fast", "residual", "srgan"])
    ap.add_argument("--tasks", nargs="+", default=["volume:4"])
    ap.add_argument("--self-ensemble", choices=["both", "on", "off"], default="both")
    ap.add_argument("--count", type=int, default=3, help="CT and MR volumes each (default 3)")
    ap.add_argument("--weights-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_validation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensembles = {"both": [False, True], "on": [True], "off": [False]}[args.self_ensemble]
    results = run(args.models, args.tasks, ensembles, args.count, args.weights_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
