"""Ideas tried for issue 10 and not adopted, kept runnable so that their figures can be checked.

Every run uses the synthetic validation data only (:func:`sr_engine.data.validation_volumes`,
with the smooth-at-native-resolution versions in slice mode); no public image is read (except
``capacity --public``).

``zssr``
    Slice x2, ZSSR-style per-series adaptation: on every validation case where the node uses
    learned weights, fine-tune those weights for ``--seconds`` on pairs made from the series'
    own low-resolution slices degraded once more by the estimated operator (the slices are the
    targets), then compare with the node's output.
``backprojection``
    Volume x4, iterative back-projection after the node (shipped weights and after
    ``--steps`` of adaptation): ``out += upsample(input - degrade(out))`` three times, with the
    estimated slab profile, the posterior mixture of the families' best members, or the true
    profile (oracle, not a choice the node can make).
``discriminator``
    Volume x4, slab family read by a patch classifier (ESPRESO-like) instead of spectra: for
    every family's best-fitting member, a small CNN learns to tell thick-axis patches from
    in-plane patches degraded by that member; the member it separates worst is the estimate.
``capacity``
    Slice x2, the truth in hand: how much a larger network would gain if the node always knew
    the true degradation family (an upper bound, not a choice the node can make).  Per case:
    ``fast`` with the true family's shipped weights, ``residual`` (about 9x the parameters and
    FLOPs) with its nominal weights and with the true family's weights from ``--weights-dir``
    (trained by the ``residual`` lines in the README, not shipped), and the best of bicubic and
    all of these per case.  ``--public`` scores the public images instead (evaluation only: run
    once, after the validation figures).
``learned-family``
    Volume x4, slab family read by a classifier (softmax regression) on the spectral misfits of
    every candidate profile, the y/x difference of the in-plane misfits and the z spectrum,
    trained on other phantom volumes (seed 777, FWHM 0.75 / 0.95 / 1.05 / 1.25) and scored on
    the validation volumes (FWHM 0.7 / 1.0 / 1.3) against the best-fitting family.

Usage: .venv/bin/python -m benchmarks.eval_alternatives
       {zssr,backprojection,discriminator,learned-family,capacity} [--weights-dir DIR] [--public]
Prints one line per case and a summary; writes benchmarks/results/eval_alternatives_<name>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from benchmarks.eval_adapt import ALL_PROFILES
from benchmarks.volume_run import run_volume, score_volume
from sr_engine import EnhanceRequest, training
from sr_engine.data import VALIDATION_SEED, validation_volumes
from sr_engine.degrade import SLAB_PROFILES, Degradation, apply_inplane, apply_throughplane
from sr_engine.estimate import (
    FWHM_GRID,
    estimate_slab,
    family_posterior,
    operator_of,
    slab_candidate_curve,
    slab_lines,
)
from sr_engine.models import load_model
from sr_engine.models.base import interpolate
from sr_engine.normalise import mapping_for

RESULTS = Path(__file__).resolve().parent / "results"
AXES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


# --- zssr -----------------------------------------------------------------------------------

def zssr(args: argparse.Namespace) -> list[dict]:
    """Slice x2 cross-scale adaptation against the node's own output (validation cases)."""
    from benchmarks.eval_robust import SLICE_DEGRADATIONS, _slice_cases, low_resolution_slices

    scale, patch = 2, 48
    rows = []
    for name, vol, spacing, modality in _slice_cases(True):
        for label, deg, held_out in SLICE_DEGRADATIONS:
            if held_out:
                continue
            hr, lr = low_resolution_slices(vol, modality, scale, deg)
            sp = (spacing[0], spacing[1] * scale, spacing[2] * scale)
            node, res = run_volume(lr, sp, spacing[0], modality, EnhanceRequest(scale=scale), hr)
            group = res.extra.get("weights_group")
            if res.model_name == "bicubic" or not group or res.degradation is None:
                continue  # the node interpolates: nothing to adapt
            interp, _ = run_volume(lr, sp, spacing[0], modality, EnhanceRequest(
                scale=scale, model="bicubic", estimate_degradation=False), hr)
            op = operator_of(res.degradation)
            assert op is not None
            net, _ = load_model("fast", "slice", scale, None, group)
            m2 = mapping_for(lr, modality)
            xl = torch.from_numpy(m2.forward(lr).astype(np.float32)).unsqueeze(1)

            def score(model: nn.Module, xl: torch.Tensor = xl, m2: object = m2,
                      hr: np.ndarray = hr, modality: str = modality) -> float:
                model.eval()
                with torch.inference_mode():
                    out = model(xl).squeeze(1).numpy()
                return score_volume(m2.inverse(out), hr, modality)  # type: ignore[attr-defined]

            before = score(net)
            n, _, hh, ww = xl.shape
            opt = torch.optim.Adam(net.parameters(), 3e-4)
            gen = torch.Generator().manual_seed(0)
            net.train()
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                i = torch.randint(0, n, (8,), generator=gen)
                ys = torch.randint(0, hh - patch + 1, (8,), generator=gen)
                xs = torch.randint(0, ww - patch + 1, (8,), generator=gen)
                target = torch.stack([xl[a, :, b:b + patch, c:c + patch]
                                      for a, b, c in zip(i, ys, xs, strict=True)])
                if torch.rand(1, generator=gen) < 0.5:
                    target = target.transpose(-1, -2)
                with torch.no_grad():
                    source = apply_inplane(target, scale, op, gen)
                loss = F.mse_loss(net(source), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            after = score(net)
            row = {"case": name, "degradation": label, "weights": group, "steps": steps,
                   "node": round(node - interp, 3), "before": round(before - interp, 3),
                   "zssr": round(after - interp, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    delta = np.array([r["zssr"] - r["before"] for r in rows])
    print(f"{len(rows)} cases with learned weights: ZSSR - node's weights mean {delta.mean():+.2f}"
          f" dB (worst {delta.min():+.2f}, best {delta.max():+.2f}); below bicubic by > 0.1 dB: "
          f"{sum(r['zssr'] < -0.1 for r in rows)} (node: {sum(r['before'] < -0.1 for r in rows)})")
    return rows


# --- back-projection ------------------------------------------------------------------------

def _degrade_z(v: np.ndarray, deg: Degradation, scale: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))).unsqueeze(1)
    return apply_throughplane(t, scale, deg).squeeze(1).numpy().transpose(1, 2, 0)


def _upsample_z(r: np.ndarray, scale: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1))).unsqueeze(1)
    return interpolate(t, scale, 1).squeeze(1).numpy().transpose(1, 2, 0)


def _backproject(out: np.ndarray, lr: np.ndarray, members: list[tuple[float, Degradation]],
                 scale: int, iterations: int = 3) -> np.ndarray:
    o = out.copy()
    for _ in range(iterations):
        o = o + _upsample_z(lr - sum(p * _degrade_z(o, d, scale) for p, d in members), scale)
    return o


def backprojection(args: argparse.Namespace) -> list[dict]:
    """Volume x4: iterative back-projection with the estimated, posterior or true profile."""
    scale = 4
    original = training.adapt_on_series
    training.adapt_on_series = functools.partial(original, max_steps=args.steps)
    rows = []
    try:
        for name, vol, spacing, modality in validation_volumes(args.count, (96, 128, 128)):
            mapping = mapping_for(vol, modality)
            for label, deg in ALL_PROFILES:
                with torch.inference_mode():
                    lr_net = _degrade_z(mapping.forward(vol).astype(np.float32), deg, scale)
                lr = np.ascontiguousarray(mapping.inverse(lr_net))
                lsp = (spacing[0] * scale, spacing[1], spacing[2])
                base = score_volume(mapping.inverse(_upsample_z(lr_net, scale)), vol, modality)
                row: dict = {"case": name, "profile": label}
                for key, seconds in (("shipped", 0.0), ("adapted", 3600.0)):
                    s, res = run_volume(lr, lsp, lsp[0], modality, EnhanceRequest(
                        mode="volume", scale=scale, adapt_seconds=seconds), vol)
                    row[key] = round(s - base, 3)
                    out = mapping.forward(res.volume[: vol.shape[0]].astype(np.float32))
                    p = res.degradation.parameters
                    w = family_posterior([p[f"misfit_{f}"] for f in SLAB_PROFILES])
                    choices = {
                        "estimated": [(1.0, operator_of(res.degradation))],
                        "posterior": [(wf, Degradation.of(f, fwhm=p[f"fwhm_{f}"]))
                                      for wf, f in zip(w, SLAB_PROFILES, strict=True)],
                        "true": [(1.0, deg)]}
                    for tag, members in choices.items():
                        o = _backproject(out, lr_net, members, scale)  # type: ignore[arg-type]
                        row[f"{key}+bp_{tag}"] = round(
                            score_volume(mapping.inverse(o), vol, modality) - base, 3)
                    # back-projection only where the estimate reads a wide profile
                    row[f"{key}+bp_posterior_wide"] = (row[f"{key}+bp_posterior"]
                                                       if p["fwhm"] >= 1.0 else row[key])
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        training.adapt_on_series = original
    for subset, keep in (("all", lambda r: True),
                         ("volumes after the first CT/MR pair",
                          lambda r: not r["case"].endswith("_0"))):
        chosen = [r for r in rows if keep(r)]
        if not chosen:
            continue
        print(f"{subset} ({len(chosen)} cases)")
        for k in rows[0]:
            if k not in ("case", "profile"):
                vals = [r[k] for r in chosen]
                print(f"  {k:28s} mean {np.mean(vals):+.2f} worst {np.min(vals):+.2f}")
    return rows


# --- discriminator --------------------------------------------------------------------------

PZ, PW = 8, 24  # thick-axis patch: 8 thick samples x 24 fine samples


def _thick_patches(lr: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    nz, ny, nx = lr.shape
    out = []
    for _ in range(n):
        z0 = rng.integers(0, nz - PZ + 1)
        if rng.random() < 0.5:
            y, x0 = rng.integers(0, ny), rng.integers(0, nx - PW + 1)
            p = lr[z0:z0 + PZ, y, x0:x0 + PW]
        else:
            x, y0 = rng.integers(0, nx), rng.integers(0, ny - PW + 1)
            p = lr[z0:z0 + PZ, y0:y0 + PW, x]
        out.append(np.ascontiguousarray(p[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]))
    t = torch.from_numpy(np.stack(out)).float()[:, None]
    return t - t.mean(dim=(2, 3), keepdim=True)


def _inplane_patches(lr: np.ndarray, n: int, scale: int,
                     rng: np.random.Generator) -> torch.Tensor:
    nz = lr.shape[0]
    out = []
    for _ in range(n):
        plane = lr[rng.integers(0, nz)]
        plane = plane if rng.random() < 0.5 else plane.T
        a0 = rng.integers(0, plane.shape[0] - PZ * scale + 1)
        b0 = rng.integers(0, plane.shape[1] - PW + 1)
        p = plane[a0:a0 + PZ * scale, b0:b0 + PW]
        out.append(np.ascontiguousarray(p[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]))
    return torch.from_numpy(np.stack(out)).float()[:, None]


class _Critic(nn.Module):
    def __init__(self, features: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, features, 3), nn.Conv2d(features, features, 3)
        self.head = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))).mean(dim=(2, 3))).squeeze(1)


def _separability(thick: torch.Tensor, fake: torch.Tensor, steps: int = 300) -> float:
    """Held-out cross-entropy of a critic telling the two apart (high: hard to tell apart)."""
    torch.manual_seed(0)
    n = min(len(thick), len(fake))
    k = int(0.7 * n)
    s = thick.std()
    thick, fake = thick / s, fake / s
    critic = _Critic()
    opt = torch.optim.Adam(critic.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(128), torch.zeros(128)
    for _ in range(steps):
        i = torch.randint(0, k, (128,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(critic(torch.cat([thick[i], fake[i]])),
                                                  torch.cat([ones, zeros]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = critic(torch.cat([thick[k:n], fake[k:n]]))
        return float(F.binary_cross_entropy_with_logits(
            logits, torch.cat([torch.ones(n - k), torch.zeros(n - k)])))


def discriminator(args: argparse.Namespace) -> list[dict]:
    """Volume x4 slab family: patch critic against the spectral estimate (validation)."""
    scale = 4
    profiles = [Degradation.of(f, fwhm=w) for f in SLAB_PROFILES for w in (0.7, 1.0, 1.3)]
    rows = []
    for name, vol, _, modality in validation_volumes(args.count, (96, 128, 128)):
        for orientation, axes in AXES.items():
            v = np.ascontiguousarray(vol.transpose(axes))
            hr = v[: (v.shape[0] // scale) * scale]
            x = mapping_for(hr, modality).forward(hr).astype(np.float32)
            for deg in profiles:
                with torch.inference_mode():
                    lr = np.ascontiguousarray(_degrade_z(x, deg, scale))
                est = estimate_slab(lr, scale, 1.0)
                rng = np.random.default_rng(0)
                thick = _thick_patches(lr, args.patches, rng)
                fine = _inplane_patches(lr, args.patches, scale, rng)
                seps = {}
                for f in SLAB_PROFILES:
                    member = Degradation.of(f, fwhm=est.parameters[f"fwhm_{f}"])
                    with torch.no_grad():
                        fake = apply_throughplane(fine, scale, member)
                    seps[f] = round(_separability(thick, fake - fake.mean(dim=(2, 3),
                                                                          keepdim=True)), 4)
                row = {"case": name, "orientation": orientation, "family": deg.family,
                       "fwhm": deg.get("fwhm"), "spectral": est.family,
                       "critic": max(seps, key=lambda f: seps[f]), "separability": seps}
                rows.append(row)
                print(json.dumps(row), flush=True)
    for key in ("spectral", "critic"):
        right = np.mean([r[key] == r["family"] for r in rows])
        print(f"{key:9s} family right in {right:.1%} of {len(rows)} cases "
              f"(chance {1 / len(SLAB_PROFILES):.1%})")
    return rows


# --- learned family --------------------------------------------------------------------------

def _misfit_features(volume: np.ndarray, scale: int, bands: int = 6,
                     max_lines: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Spectral features of a thick volume and every family's best misfit (estimate_slab's)."""
    target, refs = slab_lines(volume, scale, bands, max_lines)
    curves = [np.array([slab_candidate_curve(lines, scale, family, fwhm, bands)[2:] - target[2:]
                        for family in SLAB_PROFILES for fwhm in FWHM_GRID])
              for lines in (np.concatenate(refs), *refs)]
    both, along_y, along_x = curves
    misfit = np.mean(both ** 2, axis=1)
    best = misfit.reshape(len(SLAB_PROFILES), -1).min(axis=1)
    features = np.concatenate([np.log(misfit + 1e-4), np.log(best + 1e-4) - np.log(best.min()
                                                                                   + 1e-4),
                               (along_y - along_x).mean(axis=0), target[2:]])
    return features, best


def _family_cases(seed: int, count: int, widths: tuple[float, ...]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, truth, best = [], [], []
    for _, vol, _, modality in validation_volumes(count, (96, 128, 128), seed=seed):
        for axes in AXES.values():
            v = np.ascontiguousarray(vol.transpose(axes))
            hr = v[: (v.shape[0] // 4) * 4]
            x = mapping_for(hr, modality).forward(hr).astype(np.float32)
            for i, family in enumerate(SLAB_PROFILES):
                for width in widths:
                    with torch.inference_mode():
                        lr = _degrade_z(x, Degradation.of(family, fwhm=width), 4)
                    f, b = _misfit_features(np.ascontiguousarray(lr), 4)
                    feats.append(f)
                    truth.append(i)
                    best.append(b)
    return np.array(feats), np.array(truth), np.array(best)


def learned_family(args: argparse.Namespace) -> list[dict]:
    """Slab family from a classifier on spectral features, against the best misfit."""
    x_train, y_train, _ = _family_cases(777, 4, (0.75, 0.95, 1.05, 1.25))
    x_test, y_test, best = _family_cases(VALIDATION_SEED, 3, (0.7, 1.0, 1.3))
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    a = torch.from_numpy((x_train - mu) / sd).float()
    b = torch.from_numpy((x_test - mu) / sd).float()
    rows = []
    for l2 in (1.0, 0.1, 0.01):
        torch.manual_seed(0)
        head = nn.Linear(a.shape[1], len(SLAB_PROFILES))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=500)

        def closure(head: nn.Linear = head, opt: torch.optim.LBFGS = opt,
                    l2: float = l2) -> torch.Tensor:
            opt.zero_grad()
            loss = (F.cross_entropy(head(a), torch.from_numpy(y_train))
                    + l2 * head.weight.pow(2).sum() / len(a))
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            p = F.softmax(head(b), dim=1).numpy()
            train_right = float((head(a).argmax(1).numpy() == y_train).mean())
        row = {"l2": l2, "train_right": round(train_right, 3),
               "test_right": round(float((p.argmax(1) == y_test).mean()), 3),
               "test_mean_log_p": round(float(np.mean(np.log(
                   p[np.arange(len(y_test)), y_test] + 1e-12))), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"best-fitting family (spectral misfit) right in "
          f"{float((best.argmin(axis=1) == y_test).mean()):.1%} of {len(y_test)} validation cases")
    return rows


# --- capacity -------------------------------------------------------------------------------

def _forced(lr: np.ndarray, sp: tuple[float, float, float], thickness: float, modality: str,
            hr: np.ndarray, model: str, group: str | None,
            weights_dir: Path | None = None) -> float:
    """PSNR of ``model`` with the weights of ``group`` (None: nominal), no estimate."""
    from sr_engine import inference

    saved = inference.choose_model
    inference.choose_model = lambda *a, **k: (model, group, None)  # type: ignore[assignment]
    try:
        res = inference.enhance_volume(lr, sp, thickness, modality, EnhanceRequest(
            scale=2, model=model, estimate_degradation=False), weights_dir=weights_dir)
    finally:
        inference.choose_model = saved  # type: ignore[assignment]
    return score_volume(res.volume, hr, modality)


def capacity(args: argparse.Namespace) -> list[dict]:
    """Slice x2 gains with the true family's weights, ``fast`` against ``residual``."""
    from benchmarks.eval_public import SLICE_FILES, load_dicom_case
    from benchmarks.eval_robust import SLICE_DEGRADATIONS, _slice_cases, low_resolution_slices
    from sr_engine.degrade import INPLANE_GROUPS, inplane_group

    wd = Path(args.weights_dir)
    missing = [g for g in INPLANE_GROUPS
               if not (wd / f"residual_slice_x2_{g}.safetensors").is_file()]
    if missing:
        raise SystemExit(f"no residual weights for {', '.join(missing)} in {wd}")
    cases = ([load_dicom_case(f) for f in SLICE_FILES] if args.public
             else _slice_cases(True))
    rows = []
    for name, vol, spacing, modality in cases:
        for label, deg, held_out in SLICE_DEGRADATIONS:
            if held_out and not args.public:
                continue
            hr, lr = low_resolution_slices(vol, modality, 2, deg)
            sp = (spacing[0], spacing[1] * 2, spacing[2] * 2)
            group = inplane_group(deg)
            interp = _forced(lr, sp, spacing[0], modality, hr, "bicubic", None)
            row = {"case": name, "degradation": label, "held_out": held_out, "group": group,
                   "smooth_hr": not (args.public or name.endswith("| sharp"))}
            for key, model, g, d in (("fast_nominal", "fast", None, None),
                                     ("fast_family", "fast", group, None),
                                     ("residual_nominal", "residual", None, None),
                                     ("residual_family", "residual", group, wd)):
                row[key] = round(_forced(lr, sp, spacing[0], modality, hr, model, g, d)
                                 - interp, 3)
            row["best_with_truth"] = max(0.0, *(row[k] for k in (
                "fast_nominal", "fast_family", "residual_nominal", "residual_family")))
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = ("fast_family", "residual_family", "residual_nominal", "best_with_truth")
    for tag, sel in (("sharp HR" if not args.public else "train split",
                      [r for r in rows if not r["smooth_hr"] and not r["held_out"]]),
                     ("smooth HR" if not args.public else "held-out",
                      [r for r in rows if r["smooth_hr"] or r["held_out"]]),
                     ("all", rows)):
        if sel:
            print(f"{tag} ({len(sel)} cases): " + ", ".join(
                f"{k} {np.mean([r[k] for r in sel]):+.2f} dB" for k in keys)
                + f"; residual_family below bicubic by > 0.1 dB: "
                f"{sum(r['residual_family'] < -0.1 for r in sel)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment",
                    choices=("zssr", "backprojection", "discriminator", "learned-family",
                             "capacity"))
    ap.add_argument("--seconds", type=float, default=10.0, help="zssr: adaptation per case")
    ap.add_argument("--steps", type=int, default=3000, help="backprojection: adaptation steps")
    ap.add_argument("--count", type=int, default=1, help="CT and MR volumes each")
    ap.add_argument("--patches", type=int, default=3000, help="discriminator: patches per side")
    ap.add_argument("--weights-dir", default="/tmp/srnode_capacity/w",
                    help="capacity: folder of residual_slice_x2_<family>.safetensors")
    ap.add_argument("--public", action="store_true",
                    help="capacity: the public images (evaluation only, after the decision)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"zssr": zssr, "backprojection": backprojection, "discriminator": discriminator,
            "learned-family": learned_family, "capacity": capacity}[args.experiment](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "_public" if getattr(args, "public", False) else ""
    (RESULTS / f"eval_alternatives_{args.experiment}{tag}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
