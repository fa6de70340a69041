"""Volume x4 per-series adaptation variants on the held-out synthetic validation volumes.

Decides how the node adapts (issue 10) without looking at MNI152: for thick-slice versions of
the validation phantoms (:func:`sr_engine.data.validation_volumes`, several slab profiles), the
PSNR gain over cubic of the node's choice without adaptation and with each adaptation variant:

* ``estimated``: pairs degraded with the estimated profile (family and FWHM), constant lr, L1
  (the adaptation before the MSE default);
* ``hedged``: pairs degraded in turn with every profile family at the estimated FWHM;
* ``hedged-decay``: the same with a higher peak lr decaying along the time budget;
* ``estimated-decay``, ``estimated-mse``, ``estimated-batch16``: the estimated profile with a
  decaying higher lr, with the MSE loss, with 16 patches per step;
* ``estimated-mse-swa``, ``estimated-mse-ema``: MSE with the weights averaged uniformly over the
  second half of the budget, or as an exponential moving average (decay 0.995).

Usage: .venv/bin/python -m benchmarks.eval_adapt [--seconds 20] [--threads 1]
Writes benchmarks/results/eval_adapt.json.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.eval_robust import _run
from sr_engine import EnhanceRequest, training
from sr_engine.data import validation_volumes
from sr_engine.degrade import SLAB_PROFILES, Degradation, apply_throughplane
from sr_engine.normalise import mapping_for

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = [("box 1.3", Degradation.of("box", fwhm=1.3)),
            ("box 0.7", Degradation.of("box", fwhm=0.7)),
            ("gauss 1.0", Degradation.of("gaussian", fwhm=1.0)),
            ("sinc 0.7", Degradation.of("sinc", fwhm=0.7))]
ORIGINAL = training.adapt_on_series


def _hedged(net: torch.nn.Module, volume: np.ndarray, scale: int,
            profile: Degradation | list[Degradation], seconds: float, **kw: object
            ) -> dict[str, float]:
    """Adaptation with every profile family at the estimated FWHM."""
    first = profile if isinstance(profile, Degradation) else profile[0]
    mix = [Degradation.of(f, fwhm=first.get("fwhm", 1.0)) for f in SLAB_PROFILES]
    return ORIGINAL(net, volume, scale, mix, seconds, **kw)  # type: ignore[arg-type]


VARIANTS = {"estimated": functools.partial(ORIGINAL, loss="l1"),
            "hedged": functools.partial(_hedged, loss="l1"),
            "hedged-decay": functools.partial(_hedged, learning_rate=6e-4, decay=True, loss="l1"),
            "estimated-decay": functools.partial(ORIGINAL, learning_rate=6e-4, decay=True,
                                                 loss="l1"),
            "estimated-mse": functools.partial(ORIGINAL, loss="mse"),
            "estimated-batch16": functools.partial(ORIGINAL, batch_size=16, loss="l1"),
            "estimated-mse-swa": functools.partial(ORIGINAL, loss="mse", average_from=0.5),
            "estimated-mse-ema": functools.partial(ORIGINAL, loss="mse", ema=0.995)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--count", type=int, default=1, help="CT and MR volumes each")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_adapt.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = 4
    rows = []
    for name, vol, spacing, modality in validation_volumes(args.count, (96, 128, 128)):
        mapping = mapping_for(vol, modality)
        for label, deg in PROFILES:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(mapping.forward(vol).transpose(2, 0, 1)))
                lr_net = apply_throughplane(x.unsqueeze(1), scale, deg).squeeze(1).numpy()
            lr = np.ascontiguousarray(mapping.inverse(lr_net).transpose(1, 2, 0))
            lsp = (spacing[0] * scale, spacing[1], spacing[2])
            req = {"mode": "volume", "scale": scale}
            base, _ = _run(lr, lsp, lsp[0], modality,
                           EnhanceRequest(model="cubic", estimate_degradation=False, **req), vol)
            node, res = _run(lr, lsp, lsp[0], modality, EnhanceRequest(**req), vol)
            row = {"case": name, "profile": label, "node": round(node - base, 3),
                   "estimate": res.degradation.as_dict() if res.degradation else None}
            for v in args.variants:
                training.adapt_on_series = VARIANTS[v]  # type: ignore[assignment]
                try:
                    score, ares = _run(lr, lsp, lsp[0], modality,
                                       EnhanceRequest(adapt_seconds=args.seconds, **req), vol)
                finally:
                    training.adapt_on_series = ORIGINAL  # type: ignore[assignment]
                row[v] = round(score - base, 3)
                row[f"{v}_steps"] = (ares.adaptation or {}).get("steps")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "estimate"}), flush=True)
    summary = {v: {"mean": round(float(np.mean([r[v] for r in rows])), 3),
                   "worst": round(float(np.min([r[v] for r in rows])), 3)}
               for v in ["node", *args.variants]}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary,
                                    "seconds": args.seconds}, indent=1))


if __name__ == "__main__":
    main()
