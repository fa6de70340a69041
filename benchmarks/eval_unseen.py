"""Degradations outside every trained family: does the node still keep its promise?

``eval_robust`` measures the families the engine knows (:mod:`sr_engine.degrade`) and a held-out
split of their *parameters*.  A hospital's data will also hold operators that are in no family
at all.  This benchmark makes low-resolution inputs with such operators, which no training,
estimator, table or threshold of the project has seen, and checks the one promise that matters
to a radiologist: the node's choice (``auto``) is never worse than the interpolation baseline
by more than 0.1 dB.  ``fast`` with its nominal weights is run beside it, to show what an
unguarded model would do.

In-plane (slice x2 and x4 on the public pydicom-data CT/MR images, evaluation data only):
antialiased bicubic and bilinear resizing (the classic SR benchmark operators), plain
decimation (every N-th pixel, aliased), a Gaussian PSF wider than any family (sigma 1.0N), an
anisotropic PSF, motion blur along one axis, heavy noise, 8-bit quantisation (an old
secondary capture), a lossy JPEG round trip (quality 75), the k-space crop without the
half-pixel phase correction (LR samples at the FFT origin instead of the block centres) and
area averaging on a grid one HR pixel off (operators: :mod:`sr_engine.stress`).
Two of these operators are no longer unseen: after this benchmark found the hedging weights
losing on aliased decimation, decimation and the off-grid area average joined the validation
phantoms' stress cases that the slice x2 selection table is built on (``eval_robust
--validation --stress``; marked ``*`` in the output, ``guarded`` in the JSON).
Through-plane (volume x2 and x4 on the nilearn MNI152 template, axial thick slices): triangle
and Hann slab profiles, a Gaussian wider than any family (FWHM 1.6x), a 50 % gap, and noisy
box slabs.

Usage: .venv/bin/python -m benchmarks.eval_unseen [--tasks slice:2 slice:4 volume:2 volume:4]
       [--adapt-seconds 0] [--threads 2]
Prints a table and writes benchmarks/results/eval_unseen.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.eval_public import SLICE_FILES, load_dicom_case, load_mni_case
from benchmarks.volume_run import run_volume
from sr_engine import EnhanceRequest
from sr_engine.stress import (
    GUARDED_ON_VALIDATION,
    INPLANE_UNSEEN,
    SLAB_UNSEEN,
    degrade_series,
)

RESULTS = Path(__file__).resolve().parent / "results"

def _score(row: dict, lr: np.ndarray, sp: tuple[float, float, float], thick: float,
           modality: str, hr: np.ndarray, base: str, mode: str, scale: int,
           adapt_seconds: float) -> dict:
    off = {"mode": mode, "scale": scale, "estimate_degradation": False}
    row["interp"], _ = run_volume(lr, sp, thick, modality, EnhanceRequest(model=base, **off), hr)
    row["fast_nominal"], _ = run_volume(lr, sp, thick, modality,
                                        EnhanceRequest(model="fast", **off), hr)
    t0 = time.perf_counter()
    row["node"], res = run_volume(lr, sp, thick, modality,
                                  EnhanceRequest(mode=mode, scale=scale), hr)
    row["node_seconds"] = round(time.perf_counter() - t0, 2)
    row["node_model"] = res.model_name + (f"[{res.extra.get('weights_group')}]"
                                          if res.extra.get("weights_group") else "")
    row["estimate"] = res.degradation.describe() if res.degradation else None
    row["fallback_reason"] = res.fallback_reason
    if adapt_seconds > 0 and mode == "volume":
        row["adapted"], _ = run_volume(lr, sp, thick, modality,
                                       EnhanceRequest(mode=mode, scale=scale,
                                                      adapt_seconds=adapt_seconds), hr)
    for k in ("fast_nominal", "node", "adapted"):
        if k in row:
            row[f"{k}_gain"] = round(row[k] - row["interp"], 3)
    return row


def slice_rows(scale: int) -> list[dict]:
    """Every public slice image under every unseen in-plane operator."""
    rows = []
    for f in SLICE_FILES:
        name, vol, spacing, modality = load_dicom_case(f)
        h, w = (vol.shape[1] // scale) * scale, (vol.shape[2] // scale) * scale
        hr = np.ascontiguousarray(vol[:, :h, :w])
        sp = (spacing[0], spacing[1] * scale, spacing[2] * scale)
        for label, op in INPLANE_UNSEEN:
            lr = degrade_series(hr, modality, op, scale, axis_last=False)
            row = {"task": f"slice x{scale}", "case": name, "degradation": label,
                   "guarded": label in GUARDED_ON_VALIDATION}
            rows.append(_score(row, lr, sp, spacing[0], modality, hr, "bicubic", "slice",
                               scale, 0.0))
            _print(rows[-1])
    return rows


def volume_rows(scale: int, adapt_seconds: float) -> list[dict]:
    """MNI152 with axial thick slices under every unseen slab profile."""
    _, vol, spacing, _ = load_mni_case()
    z = (vol.shape[0] // scale) * scale
    hr = np.ascontiguousarray(vol[:z])
    sp = (spacing[0] * scale, spacing[1], spacing[2])
    rows = []
    for label, op in SLAB_UNSEEN:
        lr = degrade_series(hr, "MR", op, scale, axis_last=True)
        row = {"task": f"volume x{scale}", "case": "MNI152 axial", "degradation": label}
        rows.append(_score(row, lr, sp, sp[0], "MR", hr, "cubic", "volume", scale,
                           adapt_seconds))
        _print(rows[-1])
    return rows


def _print(row: dict) -> None:
    extra = f" adapted {row['adapted_gain']:+.2f}" if "adapted_gain" in row else ""
    mark = "*" if row.get("guarded") else " "
    print(f"{row['task']:10} {row['case'][:22]:22} {row['degradation']:29}{mark} "
          f"interp {row['interp']:6.2f}  fast {row['fast_nominal_gain']:+6.2f}  "
          f"node {row['node_gain']:+6.2f} ({row['node_model']}){extra}", flush=True)


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per task: cases, mean and worst gain of fast and of the node, node cases below -0.1 dB."""
    out: dict[str, dict[str, float]] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        node = [r["node_gain"] for r in rs]
        fast = [r["fast_nominal_gain"] for r in rs]
        out[task] = {"cases": len(rs), "fast_mean": round(float(np.mean(fast)), 2),
                     "fast_worst": round(min(fast), 2),
                     "fast_below": sum(g < -0.1 for g in fast),
                     "node_mean": round(float(np.mean(node)), 2),
                     "node_worst": round(min(node), 2),
                     "node_below": sum(g < -0.1 for g in node),
                     "node_fallbacks": sum(r["fallback_reason"] is not None for r in rs),
                     "node_below_unseen_only": sum(r["node_gain"] < -0.1 for r in rs
                                                   if not r.get("guarded"))}
        if any("adapted_gain" in r for r in rs):
            ad = [r["adapted_gain"] for r in rs if "adapted_gain" in r]
            out[task] |= {"adapted_mean": round(float(np.mean(ad)), 2),
                          "adapted_worst": round(min(ad), 2),
                          "adapted_below": sum(g < -0.1 for g in ad)}
    return out


def main() -> None:
    """Run the chosen tasks, print per case and a summary, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["slice:2", "slice:4", "volume:2", "volume:4"])
    ap.add_argument("--adapt-seconds", type=float, default=0.0,
                    help="also run the volume cases with this much per-series adaptation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "eval_unseen.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for task in args.tasks:
        mode, scale = task.split(":")
        rows += (slice_rows(int(scale)) if mode == "slice"
                 else volume_rows(int(scale), args.adapt_seconds))
    summary = summarise(rows)
    print(f"\n{'task':10} {'cases':>5} {'fast mean':>9} {'worst':>7} {'<-0.1':>5} "
          f"{'node mean':>9} {'worst':>7} {'<-0.1':>5} {'fallbacks':>9}")
    for task, s in summary.items():
        print(f"{task:10} {s['cases']:5d} {s['fast_mean']:+9.2f} {s['fast_worst']:+7.2f} "
              f"{s['fast_below']:5d} {s['node_mean']:+9.2f} {s['node_worst']:+7.2f} "
              f"{s['node_below']:5d} {s['node_fallbacks']:9d}"
              + (f"  adapted {s['adapted_mean']:+.2f} / {s['adapted_worst']:+.2f}"
                 if "adapted_mean" in s else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"summary": summary, "rows": rows, "threads": args.threads,
                   "adapt_seconds": args.adapt_seconds,
                   "date": time.strftime("%Y-%m-%d")}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
