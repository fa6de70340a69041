"""Volume x4 per-series adaptation variants on the held-out synthetic validation volumes.

Decides how the node adapts (issue 10) without looking at MNI152: for thick-slice versions of
the validation phantoms (:func:`sr_engine.data.validation_volumes`, several slab profiles), the
PSNR gain over cubic of the node's choice without adaptation and with each adaptation variant.

How the training pairs are degraded (:func:`sr_engine.estimate.adaptation_profiles`):

* ``estimated-mse`` (the node's default before the policy sweep): the estimated profile (family
  and FWHM), MSE, constant lr;
* ``families``: every profile family's best-fitting member in turn (the slab estimate finds the
  FWHM well and the family poorly);
* ``posterior``: the same, each family as often as its misfit says (temperature
  :data:`sr_engine.estimate.ADAPT_POSTERIOR_SCALE`, 0.15, where the likelihood of the true
  family on the validation volumes peaks); ``posterior-t0.01`` with the earlier, overconfident
  temperature 0.01 (log p -3.39 against -0.98);
* ``top2``: the two best-fitting families' members;
* ``posterior-nominal``: the ``posterior`` turns, each followed by its family at the header's
  FWHM (SliceThickness over spacing); ``nominal``: the families at the header's FWHM only;
* ``oracle``: the true profile (an upper bound, not a choice the node can make).

Older variants, all with the estimated profile unless said: ``estimated`` (L1), ``hedged``
(every family at the estimated FWHM, L1), ``hedged-decay``, ``estimated-decay``,
``estimated-batch16``, ``estimated-mse-swa`` and ``estimated-mse-ema`` (weight averaging).

``--steps N`` bounds each adaptation by its step count instead of the clock, so variants are
compared at equal work whatever the machine's load; ``--device cuda`` runs the adaptation and the
inference on a GPU and ``--jobs J`` runs J cases at once (each in its own process).
``--header honest`` writes the true profile's FWHM as the slice thickness (a scanner's nominal
thickness is its slice profile's FWHM); ``contiguous`` (the default) writes the spacing whatever
the profile, so that gaps and overlaps are hidden from the header.
``--keeps 1 0.75 0.5`` scores each variant with those shares of its fine-tune kept
(``shipped + keep * (adapted - shipped)``, one adaptation per case; columns ``variant@keep``).

Usage: .venv/bin/python -m benchmarks.eval_adapt [--seconds 20] [--threads 1] [--steps N]
       [--profiles all] [--count 3] [--device cuda --jobs 12] [--keeps 1 0.75 0.5]
Writes benchmarks/results/eval_adapt.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.volume_run import run_adapted_keeps
from benchmarks.volume_run import run_volume as _run
from sr_engine import EnhanceRequest, estimate, inference, stream, training
from sr_engine.data import validation_volumes
from sr_engine.degrade import SLAB_PROFILES, Degradation, apply_throughplane
from sr_engine.normalise import mapping_for

RESULTS = Path(__file__).resolve().parent / "results"
A = Degradation.of
PROFILES = [("box 1.3", A("box", fwhm=1.3)), ("box 0.7", A("box", fwhm=0.7)),
            ("gauss 1.0", A("gaussian", fwhm=1.0)), ("sinc 0.7", A("sinc", fwhm=0.7))]
# every training-split profile of the robustness benchmark (held-out FWHMs never used here)
ALL_PROFILES = [(f"{'gauss' if f == 'gaussian' else f} {w}", A(f, fwhm=w))
                for f in SLAB_PROFILES for w in (0.7, 1.0, 1.3)]
ORIGINAL = training.adapt_on_series
ORIGINAL_PROFILES = estimate.adaptation_profiles


def _hedged(net: torch.nn.Module, volume: np.ndarray, scale: int,
            profile: Degradation | list[Degradation], seconds: float, **kw: object
            ) -> dict[str, float]:
    """Adaptation with every profile family at the estimated FWHM."""
    first = profile if isinstance(profile, Degradation) else profile[0]
    mix = [Degradation.of(f, fwhm=first.get("fwhm", 1.0)) for f in SLAB_PROFILES]
    return ORIGINAL(net, volume, scale, mix, seconds, **kw)  # type: ignore[arg-type]


# variant: (adapt_on_series replacement, adaptation policy or "oracle")
VARIANTS: dict[str, tuple[Callable[..., dict[str, float]], str]] = {
    "estimated": (functools.partial(ORIGINAL, loss="l1"), "estimated"),
    "hedged": (functools.partial(_hedged, loss="l1"), "estimated"),
    "hedged-decay": (functools.partial(_hedged, learning_rate=6e-4, decay=True, loss="l1"),
                     "estimated"),
    "estimated-decay": (functools.partial(ORIGINAL, learning_rate=6e-4, decay=True, loss="l1"),
                        "estimated"),
    "estimated-mse": (functools.partial(ORIGINAL, loss="mse"), "estimated"),
    "estimated-batch16": (functools.partial(ORIGINAL, batch_size=16, loss="l1"), "estimated"),
    "estimated-mse-swa": (functools.partial(ORIGINAL, loss="mse", average_from=0.5),
                          "estimated"),
    "estimated-mse-ema": (functools.partial(ORIGINAL, loss="mse", ema=0.995), "estimated"),
    "families": (functools.partial(ORIGINAL, loss="mse"), "families"),
    "posterior": (functools.partial(ORIGINAL, loss="mse"), "posterior"),
    "top2": (functools.partial(ORIGINAL, loss="mse"), "top2"),
    "posterior-nominal": (functools.partial(ORIGINAL, loss="mse"), "posterior-nominal"),
    "nominal": (functools.partial(ORIGINAL, loss="mse"), "nominal"),
    "oracle": (functools.partial(ORIGINAL, loss="mse"), "oracle"),
    "posterior-t0.01": (functools.partial(ORIGINAL, loss="mse"), "posterior@0.01"),
}


def _patched(variant: str, truth: Degradation, steps: int | None) -> Callable[[], None]:
    """Install a variant's adaptation and profile policy; returns the undo."""
    adapt, policy = VARIANTS[variant]
    if steps:
        adapt = functools.partial(adapt, max_steps=steps)
    if policy == "oracle":
        def profiles(*_a: object, **_k: object) -> list[Degradation]:
            return [truth]
    else:
        name, _, temperature = policy.partition("@")
        profiles = functools.partial(ORIGINAL_PROFILES, policy=name,
                                     posterior_scale=float(temperature) if temperature else None)
    training.adapt_on_series = adapt  # type: ignore[assignment]
    inference.adaptation_profiles = profiles  # type: ignore[assignment]
    stream.adaptation_profiles = profiles  # type: ignore[assignment]

    def undo() -> None:
        training.adapt_on_series = ORIGINAL  # type: ignore[assignment]
        inference.adaptation_profiles = ORIGINAL_PROFILES  # type: ignore[assignment]
        stream.adaptation_profiles = ORIGINAL_PROFILES  # type: ignore[assignment]
    return undo


@functools.cache
def _volumes(count: int) -> list[tuple[str, np.ndarray, tuple[float, float, float], str]]:
    return validation_volumes(count, (96, 128, 128))


def run_case(index: int, label: str, deg: Degradation, args: argparse.Namespace) -> dict:
    """All variants on one validation volume degraded with one slab profile."""
    torch.set_num_threads(args.threads)
    name, vol, spacing, modality = _volumes(args.count)[index]
    scale = 4
    mapping = mapping_for(vol, modality)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(mapping.forward(vol).transpose(2, 0, 1)))
        lr_net = apply_throughplane(x.unsqueeze(1), scale, deg).squeeze(1).numpy()
    lr = np.ascontiguousarray(mapping.inverse(lr_net).transpose(1, 2, 0))
    lsp = (spacing[0] * scale, spacing[1], spacing[2])
    thick = lsp[0] * (deg.get("fwhm", 1.0) if args.header == "honest" else 1.0)
    req = {"mode": "volume", "scale": scale, "device": args.device}
    base, _ = _run(lr, lsp, thick, modality,
                   EnhanceRequest(model="cubic", estimate_degradation=False, **req), vol)
    node, res = _run(lr, lsp, thick, modality, EnhanceRequest(**req), vol)
    row = {"case": name, "profile": label, "node": round(node - base, 3),
           "estimate": res.degradation.as_dict() if res.degradation else None}
    seconds = args.seconds if not args.steps else 3600.0
    for v in args.variants:
        undo = _patched(v, deg, args.steps)
        try:
            if args.keeps:
                scores, info = run_adapted_keeps(lr, lsp, thick, modality,
                                                 EnhanceRequest(adapt_seconds=seconds, **req),
                                                 vol, args.keeps)
                for k, score in scores.items():
                    row[f"{v}@{k:g}"] = round(score - base, 3)
            else:
                score, ares = _run(lr, lsp, thick, modality,
                                   EnhanceRequest(adapt_seconds=seconds, **req), vol)
                row[v] = round(score - base, 3)
                info = ares.adaptation or {}
        finally:
            undo()
        row[f"{v}_steps"] = info.get("steps")
        row[f"{v}_seconds"] = info.get("seconds")
    print(json.dumps({k: v for k, v in row.items() if k != "estimate"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=0,
                    help="bound each adaptation by steps instead of --seconds (0: time)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case")
    ap.add_argument("--count", type=int, default=1, help="CT and MR volumes each")
    ap.add_argument("--profiles", choices=("standard", "all"), default="standard",
                    help="standard: 4 profiles; all: the 9 training-split profiles")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once (processes)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--header", choices=("contiguous", "honest"), default="contiguous",
                    help="slice thickness in the header: the spacing, or the true FWHM")
    ap.add_argument("--keeps", nargs="+", type=float, default=[],
                    help="score these shares of each variant's fine-tune (one adaptation)")
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_adapt.json")
    args = ap.parse_args()
    columns = [f"{v}@{k:g}" for v in args.variants for k in sorted(args.keeps, reverse=True)
               ] if args.keeps else list(args.variants)
    profiles = ALL_PROFILES if args.profiles == "all" else PROFILES
    cases = [(i, label, deg, args) for i in range(2 * args.count) for label, deg in profiles]
    if args.jobs > 1:
        # spread the first cases over volumes and profiles (a run cut short still says something)
        order = np.random.default_rng(0).permutation(len(cases))
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.starmap(run_case, [cases[i] for i in order], chunksize=1)
        rows = [done[k] for k in np.argsort(order)]  # back to the order of ``cases``
    else:
        rows = [run_case(*c) for c in cases]
    summary = {v: {"mean": round(float(np.mean([r[v] for r in rows])), 3),
                   "worst": round(float(np.min([r[v] for r in rows])), 3)}
               for v in ["node", *columns]}
    for family in SLAB_PROFILES:
        fam = [r for r, (_, _, d, _) in zip(rows, cases, strict=True) if d.family == family]
        summary[f"by_family_{family}"] = {v: round(float(np.mean([r[v] for r in fam])), 3)
                                          for v in ["node", *columns]}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary, "seconds": args.seconds,
                                    "steps": args.steps, "device": args.device,
                                    "header": args.header}, indent=1))


if __name__ == "__main__":
    main()
