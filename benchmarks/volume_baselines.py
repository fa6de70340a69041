"""Cubic against linear interpolation on the MNI152 volume cases of the robustness benchmark.

The robustness benchmark (:mod:`benchmarks.eval_robust`) states every volume-mode gain over
cubic interpolation along z, the stricter of the two baselines; issue 10 states its volume goals
over linear interpolation.  This script measures both baselines on exactly the thick volumes
``eval_robust`` builds (same profiles, orientations and held-out split) so that a gain over
cubic converts to a gain over linear: ``gain_linear = gain_cubic + (cubic - linear)``.  No
model runs; MNI152 is evaluation data only.

Usage: .venv/bin/python -m benchmarks.volume_baselines [--scales 2 4]
Prints a table and writes benchmarks/results/volume_baselines.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.eval_public import load_mni_case
from benchmarks.eval_robust import SLAB_DEGRADATIONS, runs_volume_case, thick_case
from benchmarks.volume_run import run_volume
from sr_engine import EnhanceRequest

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--out", type=Path, default=RESULTS / "volume_baselines.json")
    args = ap.parse_args()
    _, vol, spacing, _ = load_mni_case()
    rows = []
    print(f"{'case':22} {'profile':16} {'cubic':>7} {'linear':>7} {'cubic - linear':>15}")
    for scale in args.scales:
        for orientation in ("axial", "coronal", "sagittal"):
            for label, deg, held_out in SLAB_DEGRADATIONS:
                if not runs_volume_case(orientation, scale, label):
                    continue
                hr, lr, lsp = thick_case(vol, spacing, scale, deg, orientation)
                psnr = {}
                for model in ("cubic", "linear"):
                    psnr[model], _ = run_volume(lr, lsp, lsp[0], "MR", EnhanceRequest(
                        mode="volume", scale=scale, model=model, estimate_degradation=False), hr)
                row = {"case": f"MNI152 {orientation} x{scale}", "degradation": label,
                       "held_out": held_out, **psnr,
                       "cubic_minus_linear": round(psnr["cubic"] - psnr["linear"], 3)}
                rows.append(row)
                print(f"{row['case']:22} {label + ('*' if held_out else ''):16} "
                      f"{psnr['cubic']:7.2f} {psnr['linear']:7.2f} "
                      f"{row['cubic_minus_linear']:+15.2f}", flush=True)
    diffs = [r["cubic_minus_linear"] for r in rows]
    print(f"cubic - linear: mean {np.mean(diffs):+.2f} dB, min {np.min(diffs):+.2f}, "
          f"max {np.max(diffs):+.2f} ({len(rows)} cases; * held out)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
