"""Training of the learned models on synthetic LR/HR pairs.

LR/HR pairs are made on the fly with :class:`sr_engine.degrade.RandomDegradation` from the
patches of :mod:`sr_engine.data`; L1 loss, Adam, cosine learning-rate schedule, checkpoints
with resume, a tqdm progress bar and deterministic seeds.  ``srgan`` starts from the ``residual``
weights (L1 pre-training) and is fine-tuned with a relativistic-average GAN loss plus L1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import PatchSampler, training_pool
from .degrade import Degradation, FamilyDegradation, RandomDegradation, apply_throughplane
from .errors import UnsupportedRequestError, WeightsNotFoundError
from .models import REGISTRY, Discriminator, build_model, weights_path
from .tasks import MODES

LR_PATCH = 24
#: Share of the per-series fine-tune kept (:func:`adapt_on_series`); decided on the synthetic
#: validation volumes (``benchmarks/eval_adapt.py --keeps``).
ADAPT_KEEP = 1.0


@dataclass
class TrainReport:
    """Outcome of :func:`train`.

    Attributes
    ----------
    model, mode, scale
        What was trained.
    steps
        Total optimisation steps done (including resumed ones).
    first_loss, final_loss
        Mean L1 loss over the first and last 10 % of this run's steps.
    seconds
        Wall time of this run.
    weights
        Path of the saved ``.safetensors`` file.
    parameters
        Trainable parameters of the model.
    losses
        L1 loss of every step of this run.
    """

    model: str
    mode: str
    scale: int
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    weights: Path
    parameters: int
    losses: list[float] = field(default_factory=list)


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def _patch_hw(mode: str, scale: int, lr_patch: int) -> tuple[int, int]:
    if mode == "slice":
        return lr_patch * scale, lr_patch * scale
    return lr_patch * scale, 2 * lr_patch


def train(model: str, mode: str, scale: int, steps: int, out_dir: Path, seed: int = 0,
          resume: bool = False, *, batch_size: int = 16, lr_patch: int = LR_PATCH,
          learning_rate: float | None = None, threads: int = 2, checkpoint_every: int = 200,
          init_weights: Path | None = None, phantoms: int = 24,
          checkpoint_dir: Path | None = None, pool: list[np.ndarray] | None = None,
          hr_blur: float = 0.5, hr_smooth: float = 0.0, hr_bandlimit: float | None = None,
          progress: bool = True,
          box_probability: float = 0.5,
          zero_tail: bool = False, loss: str = "l1", family: str | None = None,
          degradation: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
          ) -> TrainReport:
    """Train one model for one mode and scale and save its weights.

    Parameters
    ----------
    model
        A learned registry name (``fast``, ``srcnn``, ``residual``, ``srgan``).
    mode, scale
        ``slice`` (x2, x4) or ``volume`` (x2, x3, x4).
    steps
        Total optimisation steps (a resumed run continues up to this number).
    out_dir
        Folder for ``<model>_<mode>_x<scale>.safetensors`` and the checkpoint.
    seed
        Seed of data, degradation and initialisation.
    resume
        Continue from ``out_dir``'s checkpoint when it exists.
    batch_size
        Patches per step.
    lr_patch
        LR patch edge in pixels (volume mode: ``lr_patch`` slices by ``2*lr_patch`` pixels).
    learning_rate
        Peak Adam learning rate (default per model).
    threads
        ``torch.set_num_threads``.
    checkpoint_every
        Steps between checkpoints.
    init_weights
        Initial weights (``srgan``: defaults to the ``residual`` weights of the same task).
    phantoms
        Number of CT and of MR phantoms in the pool.
    checkpoint_dir
        Folder of the resumable checkpoint (default ``out_dir``).
    pool
        HR images in network units to train on instead of the default pool (used by
        :func:`finetune_on_series`).
    hr_blur
        Probability of Gaussian pre-blurring a HR patch (band-limited, scanner-like HR).
    hr_smooth
        Probability of a smooth-at-native-resolution HR patch (zero-filled spectrum, soft
        kernel; :func:`sr_engine.degrade.random_smooth_hr`), drawn before ``hr_blur``.
    hr_bandlimit
        Band-limit every HR patch to this fraction of its Nyquist frequency (see
        :class:`sr_engine.data.PatchSampler`; the ``interp`` weights use ``1 / scale``).
    progress
        Show the tqdm bar.
    box_probability
        Volume mode: fraction of samples degraded with the nominal contiguous box slabs.
    zero_tail
        Zero the last convolution of a freshly initialised body, so that training starts from
        the interpolated (cubic) base exactly.
    loss
        Pixel loss optimised: ``l1`` (default) or ``mse`` (PSNR-oriented fine-tuning); the
        reported losses are L1 either way.
    family
        Train over the degradation families (:class:`sr_engine.degrade.FamilyDegradation`):
        a model group (slice: ``area_sharp`` ...; volume: ``box``, ``gaussian``, ``sinc``) or
        ``all`` (or ``blind``: every family, the name of the slice x2 blind weights); the
        weights are saved as ``<model>_<mode>_x<scale>_<family>.safetensors``.
        None: the nominal random degradation and the original file name.
    degradation
        A callable ``(hr, generator) -> lr`` replacing the random degradation (used by the
        per-series adaptation with the estimated slab profile).

    Returns
    -------
    TrainReport
        Losses, timing and the weights path.
    """
    if model not in REGISTRY or not REGISTRY[model].learned:
        raise UnsupportedRequestError(f"{model!r} is not a trainable model")
    if loss not in ("l1", "mse"):
        raise UnsupportedRequestError(f"unknown loss {loss!r} (l1 or mse)")
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = _seed_all(seed)
    net = build_model(model, mode, scale)
    adversarial = model == "srgan"
    if adversarial and init_weights is None:
        init_weights = weights_path("residual", mode, scale, out_dir)
        if not init_weights.is_file():
            init_weights = weights_path("residual", mode, scale)
    if init_weights is not None:
        if not Path(init_weights).is_file():
            raise WeightsNotFoundError(f"initial weights {init_weights} not found")
        net.load_state_dict(load_file(str(init_weights)))
    elif zero_tail:
        last = [m for m in net.body.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    base_lr = learning_rate or {"fast": 2e-3, "srcnn": 1e-3, "residual": 5e-4,
                                "srgan": 5e-5}[model]
    opt = torch.optim.Adam(net.parameters(), lr=base_lr)
    disc = Discriminator() if adversarial else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999)) if disc else None
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{model}_{mode}_x{scale}{'_' + family if family else ''}.ckpt.pt"
    start = 0
    if pool is None:
        sampler = PatchSampler(training_pool(seed, phantoms), _patch_hw(mode, scale, lr_patch),
                               seed, hr_blur=hr_blur, hr_smooth=hr_smooth,
                               hr_bandlimit=hr_bandlimit)
    else:
        sampler = PatchSampler(pool, _patch_hw(mode, scale, lr_patch), seed, natural_count=0)
        if not sampler.pool:
            raise UnsupportedRequestError("no image of the pool is as large as one patch")
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        start = int(state["step"])
    if degradation is not None:
        degrade = degradation
    elif family is not None:
        degrade = FamilyDegradation(mode, scale, None if family == "all" else family)
    else:
        degrade = RandomDegradation(mode, scale, box_probability)

    def save_checkpoint(step: int) -> None:
        state = {"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "sampler_rng": sampler.rng.bit_generator.state, "step": step}
        if disc is not None:
            state |= {"disc": disc.state_dict(), "opt_d": opt_d.state_dict()}
        torch.save(state, ckpt)

    losses: list[float] = []
    t0 = time.perf_counter()
    net.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress,
               desc=f"{model} {mode} x{scale}", unit="step")
    for step in bar:
        hr = sampler.sample(batch_size)
        lr = degrade(hr, gen)
        sr = net(lr)
        l1 = F.l1_loss(sr, hr)
        pixel_loss = l1 if loss == "l1" else F.mse_loss(sr, hr)
        total = pixel_loss
        if disc is not None:
            real, fake = disc(hr), disc(sr.detach())
            d_loss = 0.5 * (F.softplus(-(real - fake.mean())).mean()
                            + F.softplus(fake - real.mean()).mean())
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            real, fake = disc(hr).detach(), disc(sr)
            g_adv = 0.5 * (F.softplus(real - fake.mean()).mean()
                           + F.softplus(-(fake - real.mean())).mean())
            total = pixel_loss + 5e-3 * g_adv
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        losses.append(l1.item())
        if step % 10 == 0:
            bar.set_postfix(l1=f"{np.mean(losses[-20:]):.5f}")
        if (step + 1) % checkpoint_every == 0:
            save_checkpoint(step + 1)
    bar.close()
    save_checkpoint(steps)
    net.eval()
    weights = weights_path(model, mode, scale, out_dir, family)
    meta = {"model": model, "mode": mode, "scale": str(scale), "steps": str(steps),
            "seed": str(seed), "data": "skimage natural images + synthetic CT/MR phantoms",
            "degradation": family or "nominal"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights), metadata=meta)
    k = max(1, len(losses) // 10)
    return TrainReport(model, mode, scale, steps,
                       float(np.mean(losses[:k])) if losses else float("nan"),
                       float(np.mean(losses[-k:])) if losses else float("nan"),
                       time.perf_counter() - t0, weights, sum(p.numel() for p in net.parameters()),
                       losses)


def finetune_on_series(volume: np.ndarray, modality: str, model: str, mode: str, scale: int,
                       out_dir: Path, steps: int = 200, seed: int = 0,
                       progress: bool = False) -> TrainReport:
    """Self-supervised fine-tuning on the incoming series itself.

    The series' own in-plane images serve as HR: slice mode degrades them further in-plane,
    volume mode degrades one in-plane axis by ``scale`` (the in-plane resolution stands in for
    the missing through-plane resolution).  Starts from the shipped weights; the result is
    written to ``out_dir`` and used with ``enhance_volume(..., weights_dir=out_dir)``.

    Parameters
    ----------
    volume
        The series ``(z, y, x)`` in modality units.
    modality
        DICOM Modality (selects the intensity mapping).
    model, mode, scale
        Which shipped model to adapt.
    out_dir
        Folder of the adapted weights.
    steps, seed
        Optimisation steps and seed.
    hr_smooth
        Probability of a smooth-at-native-resolution HR patch (zero-filled spectrum, soft
        kernel; :func:`sr_engine.degrade.random_smooth_hr`), drawn before ``hr_blur``.
    progress
        Show the tqdm bar.

    Returns
    -------
    TrainReport
        Losses and the adapted weights' path.
    """
    from .normalise import mapping_for

    mapping = mapping_for(volume, modality)
    x = mapping.forward(np.asarray(volume, dtype=np.float32))
    pool = [np.ascontiguousarray(s) for s in x]
    return train(model, mode, scale, steps, out_dir, seed, batch_size=8,
                 lr_patch=min(LR_PATCH, min(volume.shape[1:]) // (2 * scale)),
                 learning_rate={"fast": 2e-4, "srcnn": 1e-4}.get(model, 5e-5),
                 init_weights=weights_path(model, mode, scale), pool=pool, progress=progress)


def adapt_on_series(net: torch.nn.Module, volume: np.ndarray, scale: int,
                    profile: Degradation | Sequence[Degradation], seconds: float, seed: int = 0,
                    batch_size: int = 8, learning_rate: float = 3e-4,
                    decay: bool = False, loss: str = "mse", average_from: float | None = None,
                    ema: float | None = None, device: str = "cpu", max_steps: int | None = None,
                    keep: float | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float | str]:
    """Time-bounded self-supervised fine-tuning of a volume-mode model on one series (in place).

    SMORE/ECLARE idea: the series' in-plane slices are high-resolution along y and x; degrading
    them along one in-plane axis with the (estimated) slab profile gives training pairs that
    look like the thick-slice planes the model will see.

    Parameters
    ----------
    net
        The volume-mode model (weights of the estimated profile), fine-tuned in place.
    volume
        The series ``(z, y, x)`` in network units.
    scale
        Slice spacing ratio.
    profile
        Slab profile (:func:`sr_engine.degrade.apply_throughplane` family member), or several:
        each step then degrades with one of them in turn (a hedge when the profile family is
        uncertain).
    seconds
        Wall-time budget of the optimisation loop (the reported ``seconds`` include the
        set-up: patch pool and the fixed evaluation batch).
    seed
        Sampling seed.
    batch_size
        Patches per step.
    learning_rate
        Adam learning rate (constant, or the peak of a cosine decay over the time budget).
    decay
        Decay the learning rate to 10 % along a cosine of the elapsed fraction of ``seconds``.
    loss
        ``mse`` (PSNR-oriented, the default: +0.29 dB mean over L1 on the synthetic validation
        volumes, ``benchmarks/eval_adapt.py``, 20 s) or ``l1``; the reported losses use the
        same measure.
    average_from
        When set (a fraction of ``seconds``, e.g. 0.5), the weights used afterwards are the
        uniform average of the weights after every step taken from that fraction of the budget
        on (stochastic weight averaging over a constant learning rate); None keeps the last
        weights.
    ema
        When set (e.g. 0.995), the weights used afterwards are an exponential moving average of
        the weights after every step with this decay; ignored when ``average_from`` is set.
    keep
        Share of the fine-tuning kept: the weights used afterwards are
        ``shipped + keep * (adapted - shipped)`` (weight-space interpolation, WiSE-FT), which
        holds back a fine-tune fitted to statistics of the in-plane planes that the thick axis
        may not share.  None: :data:`ADAPT_KEEP`.
    clock
        Monotonic clock in seconds (injected by tests to check the budget without timing).

    Returns
    -------
    dict
        ``seconds``, ``steps``, ``keep``, ``loss_before``, ``loss_after`` (the training loss
        on a fixed batch of the series' own pairs, before and after) and ``profiles`` (the
        slab profiles and how many of every 12 steps each took, e.g. ``box 1 x7, sinc 1.1 x5``).
    """
    t0 = clock()
    keep = ADAPT_KEEP if keep is None else float(keep)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    lr_patch = max(4, min(LR_PATCH, min(volume.shape[1:]) // (2 * scale)))
    pool = [np.ascontiguousarray(s) for s in volume]
    sampler = PatchSampler(pool, _patch_hw("volume", scale, lr_patch), seed, natural_count=0)
    profiles = [profile] if isinstance(profile, Degradation) else list(profile)
    if not sampler.pool:
        return {"seconds": 0.0, "steps": 0, "loss_before": float("nan"),
                "loss_after": float("nan"), "profiles": _describe_profiles(profiles)}
    gen = torch.Generator().manual_seed(seed)
    net.to(device)
    with torch.no_grad():
        hr_eval = sampler.sample(32)
        lr_eval = torch.cat([apply_throughplane(part, scale, profiles[i % len(profiles)])
                             for i, part in enumerate(hr_eval.chunk(len(profiles)))])
        hr_eval, lr_eval = hr_eval.to(device), lr_eval.to(device)
        measure = F.l1_loss if loss == "l1" else F.mse_loss
        before = float(measure(net(lr_eval), hr_eval))
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    net.train()
    steps = 0
    params = [p for p in net.parameters() if p.requires_grad]
    shipped = [p.detach().clone() for p in params] if keep < 1.0 else None
    averaged: list[torch.Tensor] | None = None
    averaged_count = 0
    t_loop = clock()
    while (elapsed := clock() - t_loop) < seconds and (max_steps is None or steps < max_steps):
        if decay:
            for group in opt.param_groups:
                group["lr"] = learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed
                                                                          / seconds)))
        hr = sampler.sample(batch_size)
        deg = profiles[steps % len(profiles)]
        lr = apply_throughplane(hr, scale, deg, gen).to(device)
        hr = hr.to(device)
        sr = net(lr)
        objective = F.l1_loss(sr, hr) if loss == "l1" else F.mse_loss(sr, hr)
        opt.zero_grad()
        objective.backward()
        opt.step()
        steps += 1
        # weight of this step's parameters in the average: uniform (SWA) or exponential (EMA)
        if average_from is not None:
            share = (1.0 / (averaged_count + 1) if elapsed >= average_from * seconds
                     else None)
        else:
            share = None if ema is None else 1.0 - ema
        if share is not None:
            with torch.no_grad():
                if averaged is None:
                    averaged = [p.detach().clone() for p in params]
                else:
                    for a, p in zip(averaged, params, strict=True):
                        a.add_(p.detach() - a, alpha=share)
            averaged_count += 1
    if averaged is not None:
        with torch.no_grad():
            for a, p in zip(averaged, params, strict=True):
                p.copy_(a)
    if shipped is not None:
        with torch.no_grad():
            for s0, p in zip(shipped, params, strict=True):
                p.copy_(s0 + keep * (p - s0))
    net.eval()
    with torch.no_grad():
        after = float(measure(net(lr_eval), hr_eval))
    return {"seconds": round(clock() - t0, 2), "steps": steps, "keep": keep,
            "loss_before": round(before, 6), "loss_after": round(after, 6),
            "profiles": _describe_profiles(profiles)}


def _describe_profiles(profiles: Sequence[Degradation]) -> str:
    """``box 1 x7, sinc 1.1 x5``: each profile and its share of the steps (out of the list)."""
    counts: dict[str, int] = {}
    for d in profiles:
        key = f"{d.family} {d.get('fwhm', 1.0):g}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m sr_engine.training --model fast --mode slice --scale 2 ...``.

    Appends a record to ``<out>/training_log.json``.
    """
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--scale", required=True, type=int)
    ap.add_argument("--steps", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--checkpoints", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these weights (warm restart of the schedule)")
    ap.add_argument("--log-key", default=None, help="training_log.json key (default: weights)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    ap.add_argument("--box-probability", type=float, default=0.5,
                    help="volume mode: fraction of nominal contiguous box slabs")
    ap.add_argument("--zero-tail", action="store_true",
                    help="zero the last convolution (start exactly at the cubic base)")
    ap.add_argument("--loss", default="l1", choices=["l1", "mse"], help="pixel loss optimised")
    ap.add_argument("--family", default=None,
                    help="train over a degradation-family group (weights <...>_<family>)")
    ap.add_argument("--hr-blur", type=float, default=0.5,
                    help="probability of a Gaussian pre-blurred HR patch")
    ap.add_argument("--hr-smooth", type=float, default=0.0,
                    help="probability of a smooth-at-native-resolution HR patch (zero-filled "
                    "spectrum or soft kernel, sr_engine.degrade.random_smooth_hr)")
    ap.add_argument("--hr-bandlimit", type=float, default=None,
                    help="band-limit every HR patch to this fraction of Nyquist (zero-filled)")
    args = ap.parse_args(argv)
    rep = train(args.model, args.mode, args.scale, args.steps, args.out, args.seed, args.resume,
                batch_size=args.batch_size, threads=args.threads,
                checkpoint_dir=args.checkpoints, init_weights=args.init,
                learning_rate=args.lr, box_probability=args.box_probability,
                zero_tail=args.zero_tail, loss=args.loss, family=args.family,
                hr_blur=args.hr_blur, hr_smooth=args.hr_smooth,
                hr_bandlimit=args.hr_bandlimit)
    import fcntl
    import tempfile

    log_path = args.out / "training_log.json"
    lock = open(Path(tempfile.gettempdir()) / "srnode_training_log.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    key = args.log_key or rep.weights.name.removesuffix(".safetensors")
    log[key] = {
        "steps": rep.steps, "seconds": round(rep.seconds, 1), "seed": args.seed,
        "batch_size": args.batch_size, "first_l1": round(rep.first_loss, 5),
        "final_l1": round(rep.final_loss, 5), "parameters": rep.parameters,
        "command": " ".join(["python -m sr_engine.training",
                             *(argv or __import__("sys").argv[1:])])}
    log_path.write_text(json.dumps(log, indent=1, sort_keys=True))
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    print(json.dumps(log[key]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
