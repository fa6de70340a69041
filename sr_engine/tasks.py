"""What the engine can do: modes, scales and model names (no torch; cheap to import).

The one definition of these facts: rules and the config (validated at load), the CLI's choices,
the model registry and the request checks all import them from here.
"""

from __future__ import annotations

#: ``slice``: in-plane super-resolution of every slice; ``volume``: through-plane.
MODES: tuple[str, ...] = ("slice", "volume")
#: Integer factors supported in each mode.
SCALES: dict[str, tuple[int, ...]] = {"slice": (2, 4), "volume": (2, 3, 4)}
#: Learned models (one weights file per mode and scale).
LEARNED_MODELS: tuple[str, ...] = ("fast", "srcnn", "residual", "srgan")
#: Interpolation (no weights); ``bicubic`` and ``cubic`` are the same operator (the baselines
#: of slice and volume mode); ``lanczos3`` and ``lanczos6`` are sharper interpolations (Lanczos,
#: 3 and 6 lobes); ``auto`` uses ``lanczos3`` where the selection tables find it safer than the
#: learned weights, ``lanczos6`` only runs where a rule names it.
BASELINE_MODELS: tuple[str, ...] = ("bicubic", "cubic", "linear", "lanczos3", "lanczos6")
#: Every registered model name; ``auto`` chooses one by device and task.
MODEL_NAMES: tuple[str, ...] = LEARNED_MODELS + BASELINE_MODELS
AUTO_MODEL = "auto"


def is_interpolation(model: str, fallback_reason: str | None = None) -> bool:
    """Whether a model name, or a selection-table key (``lanczos3@0.5``), is an interpolation.

    With ``fallback_reason`` (the engine used interpolation instead of the requested model),
    always True: the output is an interpolation whatever the name.
    """
    return bool(fallback_reason) or model.partition("@")[0] in BASELINE_MODELS


def task_problem(mode: str, scale: int, model: str = AUTO_MODEL) -> str | None:
    """Say what is wrong with a requested task, or ``None`` when the engine supports it.

    Parameters
    ----------
    mode, scale, model
        The request.

    Returns
    -------
    str or None
        A sentence naming the problem and the allowed values.
    """
    if mode not in MODES:
        return f"mode must be one of {', '.join(MODES)}, not {mode!r}"
    if scale not in SCALES[mode]:
        allowed = ", ".join(f"x{s}" for s in SCALES[mode])
        return f"scale x{scale} is not supported in {mode} mode (use {allowed})"
    if model != AUTO_MODEL and model not in MODEL_NAMES:
        return f"unknown model {model!r}; known: {', '.join((*MODEL_NAMES, AUTO_MODEL))}"
    return None
