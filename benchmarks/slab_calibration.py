"""Calibration of the slab-family posterior on the held-out synthetic validation volumes.

The per-series adaptation (issue 10) hedges over the slab profile families in proportion to
``exp(-(misfit - best misfit) / T)`` (:func:`sr_engine.estimate.adaptation_profiles`).  This
script finds the temperature ``T`` under which those shares are honest probabilities: for thick
versions of the validation phantoms (:func:`sr_engine.data.validation_volumes`, thick slices
along each of the three axes, every training-split slab profile), it reports the mean log
likelihood and the mean probability the posterior gives the true family, per ``T``, and how often
the best-fitting family is the true one.  MNI152 and every other public image stay out of it.

Usage: .venv/bin/python -m benchmarks.slab_calibration [--count 3] [--scale 4]
Writes benchmarks/results/slab_calibration.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sr_engine.data import validation_volumes
from sr_engine.degrade import SLAB_PROFILES, Degradation, apply_throughplane
from sr_engine.estimate import ADAPT_POSTERIOR_SCALE, estimate_slab
from sr_engine.normalise import mapping_for

RESULTS = Path(__file__).resolve().parent / "results"
TEMPERATURES = (0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
AXES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def misfit_rows(count: int, scale: int) -> list[dict]:
    """Every family's best misfit for each validation volume, orientation and slab profile."""
    rows = []
    profiles = [Degradation.of(f, fwhm=w) for f in SLAB_PROFILES for w in (0.7, 1.0, 1.3)]
    for name, vol, _, modality in validation_volumes(count, (96, 128, 128)):
        for orientation, axes in AXES.items():
            v = np.ascontiguousarray(vol.transpose(axes))
            hr = v[: (v.shape[0] // scale) * scale]
            mapping = mapping_for(hr, modality)
            x = torch.from_numpy(np.ascontiguousarray(mapping.forward(hr).transpose(2, 0, 1)))
            for deg in profiles:
                with torch.inference_mode():
                    lr = apply_throughplane(x.unsqueeze(1), scale, deg).squeeze(1).numpy()
                est = estimate_slab(np.ascontiguousarray(lr.transpose(1, 2, 0)), scale, 1.0)
                rows.append({"case": name, "orientation": orientation, "family": deg.family,
                             "fwhm": deg.get("fwhm"), "estimated": est.family,
                             "misfits": {f: est.parameters[f"misfit_{f}"]
                                         for f in SLAB_PROFILES}})
    return rows


def likelihood_table(rows: list[dict]) -> list[dict]:
    """Mean log p and mean p of the true family under each temperature."""
    families = list(SLAB_PROFILES)
    m = np.array([[r["misfits"][f] for f in families] for r in rows])
    truth = np.array([families.index(r["family"]) for r in rows])
    table = []
    for t in TEMPERATURES:
        logits = -(m - m.min(axis=1, keepdims=True)) / t
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        true_p = p[np.arange(len(truth)), truth]
        table.append({"temperature": t,
                      "mean_log_p": round(float(np.mean(np.log(true_p + 1e-12))), 3),
                      "mean_p": round(float(true_p.mean()), 3)})
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=3, help="CT and MR volumes each")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "slab_calibration.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = misfit_rows(args.count, args.scale)
    table = likelihood_table(rows)
    right = float(np.mean([r["estimated"] == r["family"] for r in rows]))
    best = max(table, key=lambda e: e["mean_log_p"])
    print(f"{len(rows)} cases, x{args.scale}: best-fitting family right in {right:.1%} "
          f"(chance {1 / len(SLAB_PROFILES):.1%}); node's temperature {ADAPT_POSTERIOR_SCALE}")
    print(f"{'T':>7} {'mean log p':>11} {'mean p':>7}")
    for e in table:
        mark = "  <- most likely" if e is best else ""
        print(f"{e['temperature']:>7g} {e['mean_log_p']:>11.3f} {e['mean_p']:>7.3f}{mark}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scale": args.scale, "count": args.count,
                                    "family_right": round(right, 3), "table": table,
                                    "best_temperature": best["temperature"], "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
