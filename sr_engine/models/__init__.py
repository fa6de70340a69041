"""Model registry: every name works in ``slice`` (x2, x4) and ``volume`` (x2, x3, x4) mode.

Learned models keep one weights file per mode and scale,
``sr_engine/weights/<model>_<mode>_x<scale>.safetensors``; the baselines have no weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UnknownModelError, UnsupportedRequestError, WeightsNotFoundError
from ..tasks import AUTO_MODEL, MODEL_NAMES, SCALES, task_problem
from .base import (
    InterpolationNet,
    SRNet,
    factors_for,
    flops_per_output_pixel,
    parameter_count,
    receptive_field,
)
from .fast import FastNet
from .residual import ResidualNet
from .srcnn import SRCNN
from .srgan import Discriminator, SRGANGenerator

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BEST_MODEL = "residual"
# ``auto`` on CUDA: the best measured model per task (benchmarks/eval_public.py, PSNR gain over
# the baseline on unseen real data; see the model cards).  GAN output is never chosen by default.
BEST_BY_TASK: dict[tuple[str, int], str] = {
    ("slice", 2): "residual", ("slice", 4): "fast",
    ("volume", 2): "fast", ("volume", 3): "fast", ("volume", 4): "fast",
}


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes
    ----------
    name
        Registry name.
    build
        ``build(fy, fx) -> SRNet``.
    learned
        Whether the model needs weights.
    """

    name: str
    build: Callable[[int, int], SRNet]
    learned: bool


_BUILDERS: dict[str, tuple[Callable[[int, int], SRNet], bool]] = {
    "fast": (lambda fy, fx: FastNet(fy, fx), True),
    "srcnn": (lambda fy, fx: SRCNN(fy, fx), True),
    "residual": (lambda fy, fx: ResidualNet(fy, fx), True),
    "srgan": (lambda fy, fx: SRGANGenerator(fy, fx), True),
    "bicubic": (lambda fy, fx: InterpolationNet(fy, fx, "cubic"), False),
    "cubic": (lambda fy, fx: InterpolationNet(fy, fx, "cubic"), False),
    "linear": (lambda fy, fx: InterpolationNet(fy, fx, "linear"), False),
    "lanczos3": (lambda fy, fx: InterpolationNet(fy, fx, "lanczos3"), False),
    "lanczos6": (lambda fy, fx: InterpolationNet(fy, fx, "lanczos6"), False),
}
#: One entry per name of :data:`sr_engine.tasks.MODEL_NAMES` (a name without a builder fails
#: here, at import).
REGISTRY: dict[str, ModelSpec] = {
    name: ModelSpec(name, *_BUILDERS[name]) for name in MODEL_NAMES
}


def available_models() -> list[str]:
    """Registered model names plus ``auto``."""
    return [*REGISTRY, AUTO_MODEL]


def resolve_name(name: str, device: str, mode: str = "slice", scale: int = 2) -> str:
    """Resolve ``auto`` (CPU: ``fast``; CUDA: best measured model for the task); validate."""
    if name == AUTO_MODEL:
        return BEST_BY_TASK.get((mode, scale), BEST_MODEL) if device == "cuda" else "fast"
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    return name


def check_scale(mode: str, scale: int) -> None:
    """Raise :class:`UnsupportedRequestError` unless ``mode``/``scale`` is supported."""
    problem = task_problem(mode, scale)
    if problem is not None:
        raise UnsupportedRequestError(problem)


def build_model(name: str, mode: str, scale: int) -> SRNet:
    """Instantiate an untrained model for ``mode`` and ``scale``."""
    check_scale(mode, scale)
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnknownModelError(f"unknown model {name!r}")
    fy, fx = factors_for(mode, scale)
    return spec.build(fy, fx)


def split_group(group: str | None) -> tuple[str | None, float]:
    """A weights group and its residual scale: ``"hedge@0.5"`` -> ``("hedge", 0.5)``.

    A group name may end in ``@<alpha>``: the weights of the group with their learned residual
    over the cubic base scaled by ``alpha`` in (0, 1], i.e. ``cubic + alpha * (net - cubic)``, a
    shrinkage towards the interpolation baseline (chosen per estimate cell by the selection
    tables, see :mod:`sr_engine.estimate`).

    Raises
    ------
    ValueError
        ``alpha`` is not a number in (0, 1].
    """
    if not group or "@" not in group:
        return group, 1.0
    base, _, text = group.partition("@")
    try:
        alpha = float(text)
    except ValueError:
        raise ValueError(f"bad residual scale in weights group {group!r}") from None
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"residual scale of {group!r} must be in (0, 1]")
    return base or None, alpha


def weights_path(name: str, mode: str, scale: int, weights_dir: Path | None = None,
                 group: str | None = None) -> Path:
    """Path of the weights file in ``weights_dir`` (``[engine] weights_dir``), else shipped.

    ``group`` names the degradation-family weights (``<model>_<mode>_x<scale>_<group>``); None is
    the original (nominal-degradation) file.  A residual scale (``hedge@0.5``, see
    :func:`split_group`) uses the group's file.
    """
    folder = weights_dir or WEIGHTS_DIR
    group = split_group(group)[0]
    suffix = f"_{group}" if group else ""
    return Path(folder) / f"{name}_{mode}_x{scale}{suffix}.safetensors"


def find_weights(name: str, mode: str, scale: int, weights_dir: Path | None = None,
                 group: str | None = None) -> Path:
    """The weights file to load: ``weights_dir`` first, then the shipped one.

    An ML engineer can swap one model without copying the others.
    """
    path = weights_path(name, mode, scale, weights_dir, group)
    return path if path.is_file() else WEIGHTS_DIR / path.name


_CACHE: dict[tuple[str, float], tuple[SRNet, str]] = {}


def load_model(name: str, mode: str, scale: int, weights_dir: Path | None = None,
               group: str | None = None) -> tuple[SRNet, str]:
    """Build a model and load its weights.

    Parameters
    ----------
    name
        Registered name (not ``auto``).
    mode, scale
        Task.
    weights_dir
        Folder with ``<model>_<mode>_x<scale>.safetensors`` (default: shipped weights).
    group
        Degradation-family weights (``<model>_<mode>_x<scale>_<group>.safetensors``), or None;
        ``<group>@<alpha>`` scales the learned residual by ``alpha`` (:func:`split_group`); for
        an interpolation (``lanczos3@0.5``) only ``alpha`` counts: the kernel's difference from
        cubic is scaled.

    Returns
    -------
    tuple
        ``(model in eval mode on the CPU, version string)``.

    Raises
    ------
    WeightsNotFoundError
        A learned model has no weights for this mode and scale.
    """
    model = build_model(name, mode, scale)
    base_group, alpha = split_group(group)
    if not REGISTRY[name].learned:  # ``lanczos3@0.5``: the kernel blended halfway to cubic
        model.residual_scale = alpha
        return model.eval(), f"{name}-builtin" + (f"-residual{alpha:g}" if alpha != 1 else "")
    path = find_weights(name, mode, scale, weights_dir, base_group)
    if not path.is_file():
        raise WeightsNotFoundError(f"no weights for {name} {mode} x{scale} at {path}")
    key = (str(path), path.stat().st_mtime)
    if key not in _CACHE:
        state = load_file(str(path))
        model.load_state_dict(state)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        tag = f"-{base_group}" if base_group else ""
        _CACHE[key] = (model.eval(), f"{name}-{mode}-x{scale}{tag}-{digest}")
    cached, version = _CACHE[key]
    fresh = build_model(name, mode, scale)
    fresh.load_state_dict(cached.state_dict())
    if alpha != 1.0:
        fresh.residual_scale = alpha
        version += f"-residual{alpha:g}"
    return fresh.eval(), version


def describe(name: str, mode: str = "slice", scale: int = 2) -> dict[str, float | int | str]:
    """Receptive field (LR pixels), parameters and FLOPs per output pixel of a model."""
    model = build_model(name, mode, scale)
    return {"model": name, "mode": mode, "scale": scale,
            "receptive_field_lr_px": receptive_field(model),
            "parameters": parameter_count(model),
            "flops_per_output_pixel": round(flops_per_output_pixel(model), 1)}


__all__ = [
    "BEST_BY_TASK", "BEST_MODEL", "REGISTRY", "SCALES", "WEIGHTS_DIR", "Discriminator",
    "ModelSpec", "SRNet",
    "available_models", "build_model", "check_scale", "describe", "load_model", "resolve_name",
    "weights_path", "torch",
]
