"""``enhance_volume``: the engine's public entry point."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .api import (
    PRECISIONS,
    ConsistencyReport,
    DegradationEstimate,
    EnhanceRequest,
    EnhanceResult,
    resolve_self_ensemble,
    uses_mixed_precision,
)
from .degrade import Degradation, apply_inplane, degrade_inplane, profile_weights, slab_weights
from .errors import UnsupportedRequestError
from .estimate import (
    INTERPOLATION_CANDIDATES,
    MIN_CELL_WORST_DB,
    MIN_CONFIDENCE,
    MIN_EXPECTED_GAIN_DB,
    adaptation_profiles,
    estimate_inplane,
    estimate_slab,
    operator_of,
    slice_weights_choice,
    volume_weights_choice,
)
from .models import REGISTRY, check_scale, find_weights, load_model, resolve_name, split_group
from .models.base import factors_for, receptive_field
from .normalise import IntensityMapping, mapping_for
from .tiling import upsample_planes

LOGGER = logging.getLogger(__name__)
CT_PADDING_BELOW_HU = -1024.0


def resolve_device(requested: str) -> tuple[str, str | None]:
    """Pick ``cpu`` or ``cuda``; returns ``(device, fallback reason or None)``."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UnsupportedRequestError(f"unknown device {requested!r}")
    has_cuda = torch.cuda.is_available()
    if requested == "cpu":
        return "cpu", None
    if has_cuda:
        return "cuda", None
    return "cpu", ("CUDA requested but not available" if requested == "cuda" else None)


# A geometric variant of a plane stack ``(P, H, W)``: (flip H, flip W, swap H and W).
Variant = tuple[bool, bool, bool]


def ensemble_variants(fy: int, fx: int) -> list[Variant]:
    """Geometric self-ensemble variants for a network upsampling by ``(fy, fx)``.

    The degradations are symmetric under flips of either plane axis (slab and PSF profiles are
    symmetric about the sample centre), so a flipped input is an equally valid input: 4 flip
    variants.  With equal factors (slice mode) the transposed grid is valid as well: 8 variants.

    Parameters
    ----------
    fy, fx
        Upsampling factors along H and W.

    Returns
    -------
    list of tuple
        ``(flip H, flip W, transpose)`` per variant, the identity first.
    """
    flips = [(False, False), (False, True), (True, False), (True, True)]
    swaps = (False, True) if fy == fx else (False,)
    return [(fh, fw, t) for t in swaps for fh, fw in flips]


def _forward_variant(planes: np.ndarray, variant: Variant) -> np.ndarray:
    fh, fw, t = variant
    axes = tuple(a for a, f in ((1, fh), (2, fw)) if f)
    x = np.flip(planes, axes) if axes else planes
    if t:
        x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x)


def _inverse_variant(out: np.ndarray, variant: Variant) -> np.ndarray:
    fh, fw, t = variant
    y = out.transpose(0, 2, 1) if t else out
    axes = tuple(a for a, f in ((1, fh), (2, fw)) if f)
    return np.flip(y, axes) if axes else y


def _run(model: torch.nn.Module, planes: np.ndarray, fy: int, fx: int, device: str,
         request: EnhanceRequest, ensemble: bool = False) -> tuple[np.ndarray, int]:
    model = model.to(device, memory_format=torch.channels_last)

    def once(x: np.ndarray) -> tuple[np.ndarray, int]:
        return upsample_planes(
            model, x, fy, fx, device=device, batch_size=request.batch_size,
            tile_size=request.tile_size, tile_overlap=request.tile_overlap,
            margin=receptive_field(model) // 2 + 1,
            amp=uses_mixed_precision(request.precision, device))

    if not ensemble:
        return once(planes)
    variants = ensemble_variants(fy, fx)
    total: np.ndarray | None = None
    tiles = 0
    for v in variants:
        out, tiles_v = once(_forward_variant(planes, v))
        out = _inverse_variant(out, v)
        tiles = max(tiles, tiles_v)
        if total is None:
            total = np.array(out, dtype=np.float32, copy=True)
        else:
            total += out
        del out
    assert total is not None
    total *= np.float32(1.0 / len(variants))
    return total, tiles


def cubic_resample_z(fine: np.ndarray, positions: np.ndarray, offset: int = 0,
                     total: int | None = None) -> np.ndarray:
    """Cubic (Keys, a=-0.5) interpolation along axis 0 at fractional indices (edges clamped).

    ``fine`` may be the part ``[offset, offset + len(fine))`` of a series of ``total`` slices
    (positions are then indices of the whole series, clamped to its ends); by default it is the
    whole series.
    """
    n = fine.shape[0] if total is None else total
    base = np.floor(positions).astype(int)
    t = positions - base
    out = np.zeros((len(positions), *fine.shape[1:]), dtype=np.float32)
    a = -0.5
    for k in range(-1, 3):
        d = np.abs(t - k)
        wgt = np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                       np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))
        idx = np.clip(base + k + offset, 0, n - 1) - offset
        out += wgt.astype(np.float32)[:, None, None] * fine[idx]
    return out


def output_grid(n: int, dz: float, thickness: float, scale: int,
                output_spacing: float | None) -> tuple[np.ndarray, float]:
    """Centres (mm, relative to input slice 0) and spacing of the volume-mode output slices.

    The grid partitions the input extent ``[-T/2, (n-1)dz + T/2]`` symmetrically; with
    contiguous slabs (``T == dz``) and ``spacing = dz/r`` slab ``i`` becomes ``r`` slices centred
    at ``i*dz + (j - (r-1)/2) * T/r``.
    """
    s = float(output_spacing) if output_spacing else dz / scale
    if s <= 0:
        raise UnsupportedRequestError("output_spacing must be positive")
    extent = (n - 1) * dz + thickness
    m = max(1, int(round(extent / s)))
    mid = (n - 1) * dz / 2
    return mid + (np.arange(m) - (m - 1) / 2) * s, s


def contributing(out_centres: np.ndarray, s: float, n: int, dz: float,
                 thickness: float) -> list[list[int]]:
    """Input slices whose slab overlaps each output slice (else the interpolation neighbours)."""
    ov = slab_weights(out_centres, s, np.arange(n) * dz, thickness)
    result = []
    for k, c in enumerate(out_centres):
        idx = [int(i) for i in np.nonzero(ov[:, k] > 1e-6 * max(s, 1e-9))[0]]
        if not idx:
            f = c / dz
            idx = sorted({int(np.clip(math.floor(f), 0, n - 1)),
                          int(np.clip(math.ceil(f), 0, n - 1))})
        result.append(idx)
    return result


def _report(redegraded: np.ndarray, original: np.ndarray, data_range: float) -> ConsistencyReport:
    err = np.abs(redegraded.astype(np.float64) - original.astype(np.float64))
    mse = float(np.mean(err**2)) if err.size else 0.0
    psnr = float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)
    return ConsistencyReport(float(err.mean()), float(err.max()), psnr)


def consistency_slice(output: np.ndarray, volume: np.ndarray, scale: int,
                      mapping: IntensityMapping, batch: int = 4,
                      operator: Degradation | None = None) -> ConsistencyReport:
    """Re-degrade in-plane and compare with the input.

    ``output`` and ``volume`` are in modality units; the operator is linear, so it is applied
    directly to modality units (no large temporary copies).  ``operator``: the estimated
    degradation (noise-free); None = the nominal operator.
    """
    h, w = volume.shape[1:]
    total = sq = 0.0
    worst = 0.0
    with torch.inference_mode():
        for i in range(0, output.shape[0], batch):
            part = output[i:i + batch, : h * scale, : w * scale]
            t = torch.from_numpy(np.ascontiguousarray(part))
            if operator is None:
                red = degrade_inplane(t.unsqueeze(1), scale)
            else:
                red = apply_inplane(t.unsqueeze(1), scale, operator)
            red = red.squeeze(1).numpy().astype(np.float64)
            err = np.abs(red - volume[i:i + batch])
            total += float(err.sum())
            sq += float((err**2).sum())
            worst = max(worst, float(err.max()))
    count = volume.size
    mse = sq / count
    psnr = float("inf") if mse == 0 else 10 * math.log10(mapping.scale**2 / mse)
    return ConsistencyReport(total / count, worst, psnr)


def consistency_volume(output: np.ndarray, out_centres: np.ndarray, s: float,
                       volume: np.ndarray, dz: float, thickness: float,
                       mapping: IntensityMapping,
                       operator: Degradation | None = None) -> ConsistencyReport:
    """Average the output over each input slab and compare with the input.

    ``operator``: the estimated slab profile; None = a box of ``thickness``.
    """
    n = volume.shape[0]
    if operator is None:
        ov = slab_weights(out_centres, s, np.arange(n) * dz, thickness)
    else:
        ov = profile_weights(out_centres, s, np.arange(n) * dz, dz, operator)
    ov = ov / np.maximum(ov.sum(axis=1, keepdims=True), 1e-12)
    red = np.tensordot(ov.astype(np.float32), output, axes=(1, 0))
    return _report(red, volume, mapping.scale)


def check_consistency(result: EnhanceResult, volume: np.ndarray,
                      spacing: tuple[float, float, float], slice_thickness: float,
                      modality: str, mode: str, scale: int,
                      degradation: DegradationEstimate | None = None) -> ConsistencyReport:
    """Re-run the consistency check of a (possibly modified) result against its input.

    The operator is the estimated degradation (``degradation``, else ``result.degradation``)
    when it is known and inside the trained families; otherwise the nominal operator.

    Parameters
    ----------
    result
        Output of :func:`enhance_volume` (its ``volume`` may have been changed since).
    volume, spacing, slice_thickness, modality
        The input given to :func:`enhance_volume`.
    mode, scale
        The task.
    degradation
        The estimate whose operator re-degrades the output (default: the result's).

    Returns
    -------
    ConsistencyReport
        Errors in modality units and PSNR of the re-degraded output against the input.
    """
    volume = np.asarray(volume, dtype=np.float32)
    mapping = mapping_for(volume, modality)
    operator = consistency_operator(degradation or result.degradation, mode)
    if mode == "slice":
        return consistency_slice(result.volume, volume, scale, mapping, operator=operator)
    dz = float(spacing[0])
    thickness = float(slice_thickness) if slice_thickness and slice_thickness > 0 else dz
    return consistency_volume(result.volume, np.asarray(result.slice_offsets), result.spacing[0],
                              volume, dz, thickness, mapping, operator)


def consistency_operator(estimate: DegradationEstimate | None, mode: str) -> Degradation | None:
    """The operator of the consistency check: the estimate's when usable, else None (nominal)."""
    if estimate is None or not estimate.in_family or estimate.mode != mode:
        return None
    return operator_of(estimate)


BASELINE = {"slice": "bicubic", "volume": "cubic"}
# Weights groups the nominal (non-family) weights were trained for: used when no family
# weights exist for the estimated group.
NOMINAL_GROUPS = {"slice": ("area_soft",), "volume": ("box",)}


def choose_model(requested: str, name: str, mode: str, scale: int,
                 estimate: DegradationEstimate | None,
                 weights_dir: Path | None = None) -> tuple[str, str | None, str | None]:
    """Pick the weights for an estimated degradation, or the interpolation fallback.

    Only ``auto`` (the node's choice) is steered by the estimate: it uses the family weights of
    the resolved model (else of ``fast``), the nominal weights when the estimated group is the
    one they were trained for, a sharper interpolation (``lanczos3`` blended with bicubic, e.g.
    group ``lanczos3@0.5``) where the slice selection table keeps no weights but finds it safe
    for the estimate, and otherwise, or when the estimate is
    uncertain or outside every trained family, the mode's interpolation baseline.  Every
    interpolation comes with a reason (the derived series is then not SR).  An explicit model
    name is obeyed as before (nominal weights, no fallback); the estimate is still reported.

    Parameters
    ----------
    requested
        The requested model name (``auto`` or explicit).
    name
        Resolved model name.
    mode, scale
        Task.
    estimate
        The series' degradation estimate (None: no estimate, nominal weights).
    weights_dir
        Optional weights folder.

    Returns
    -------
    tuple
        ``(model name, weights group or None, fallback reason or None)``; on fallback the
        model name is the mode's interpolation baseline or the interpolation the table chose.
    """
    if estimate is None or requested != "auto" or not REGISTRY[name].learned:
        return name, None, None
    baseline = BASELINE[mode]
    if estimate.family == "unknown" or not estimate.in_family:
        return baseline, None, (estimate.reason or "degradation could not be estimated")[:150]
    pick = slice_weights_choice(estimate, scale, weights_dir) if mode == "slice" else None
    if estimate.confidence < MIN_CONFIDENCE and not (pick is not None and pick[2]):
        return baseline, None, (f"estimate uncertain ({estimate.family}, confidence "
                                f"{estimate.confidence:.2f})")
    family = estimate.family
    if mode == "volume":
        vpick = volume_weights_choice(estimate, scale, weights_dir)
        if vpick == "nominal":
            return name, None, None
        family = vpick or family
    if pick is not None:
        family, gain, covered = pick
        kernel, alpha = split_group(family)
        if family in INTERPOLATION_CANDIDATES:  # a safer interpolation
            # (the table already held its worst case to sr_engine.estimate.MIN_KERNEL_WORST_DB)
            blend = f" blended {alpha:g} from {baseline}" if alpha != 1 else ""
            return kernel, family, (f"{kernel}{blend} is the safest choice for this estimate "
                                    f"(worst validation gain {gain:+.2f} dB over {baseline}; "
                                    f"{estimate.family}, confidence {estimate.confidence:.2f})")
        if gain <= (MIN_CELL_WORST_DB if covered else MIN_EXPECTED_GAIN_DB):
            why = ("too few validation cases" if family == "none"
                   else f"validation gain {gain:+.2f} dB")
            return baseline, None, (f"no weights safe enough for this estimate ({why}; "
                                    f"{estimate.family}, confidence {estimate.confidence:.2f})")
        if family == "nominal":
            return name, None, None
    for candidate in dict.fromkeys((name, "fast")):
        if find_weights(candidate, mode, scale, weights_dir, family).is_file():
            return candidate, family, None
    if estimate.family in NOMINAL_GROUPS[mode]:
        return name, None, None
    return baseline, None, f"no weights for {estimate.family} x{scale}"


def _clip_plausible(out: np.ndarray, volume: np.ndarray, modality: str) -> None:
    vmin, vmax = float(volume.min()), float(volume.max())
    margin = 0.1 * max(vmax - vmin, 1e-6)
    lo, hi = vmin - margin, vmax + margin
    if modality.upper() == "CT":
        lo = max(lo, min(vmin, -1024.0))
    elif vmin >= 0:
        lo = max(lo, 0.0)
    np.clip(out, lo, hi, out=out)


def enhance_volume(volume: np.ndarray, spacing: tuple[float, float, float],
                   slice_thickness: float, modality: str, request: EnhanceRequest,
                   *, weights_dir: Path | None = None) -> EnhanceResult:
    """Super-resolve a volume in modality units.

    Parameters
    ----------
    volume
        float32 ``(z, y, x)`` in modality units (CT: HU).
    spacing
        ``(dz, dy, dx)`` in mm; ``dz`` is the centre-to-centre slice spacing.
    slice_thickness
        Nominal slice thickness in mm (``<= 0``: taken as ``dz``).
    modality
        DICOM Modality (``CT`` uses the fixed HU mapping; others a per-series factor).
    request
        What to do (mode, scale, model, device, tiling, self-ensemble).
    weights_dir
        Optional folder with weights (``[engine] weights_dir``; default: the shipped weights).

    Returns
    -------
    EnhanceResult
        The enhanced float32 volume, its geometry, provenance and consistency check.

    Raises
    ------
    UnsupportedRequestError
        Bad shape, mode, scale or device.
    UnknownModelError, WeightsNotFoundError
        The model cannot be loaded.
    """
    t0 = time.perf_counter()
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise UnsupportedRequestError(f"volume must be (z, y, x), got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise UnsupportedRequestError("volume contains NaN or infinite values")
    mode, scale = request.mode, int(request.scale)
    check_scale(mode, scale)
    if mode == "volume" and volume.shape[0] < 2:
        raise UnsupportedRequestError("volume mode needs at least two slices")
    dz, dy, dx = (float(v) for v in spacing)
    thickness = float(slice_thickness) if slice_thickness and slice_thickness > 0 else dz
    if request.precision not in PRECISIONS:
        raise UnsupportedRequestError(f"unknown precision {request.precision!r} "
                                      f"(expected one of {', '.join(PRECISIONS)})")
    device, fallback = resolve_device(request.device)
    name = resolve_name(request.model, device, mode, scale)
    mapping = mapping_for(volume, modality)
    # CT values below -1024 HU are padding (outside the reconstruction circle): the network sees
    # air there and the padding value is restored afterwards (nearest input pixel).
    padding = volume < CT_PADDING_BELOW_HU if modality.upper() == "CT" else None
    if padding is not None and not padding.any():
        padding = None
    x = mapping.forward(volume if padding is None else np.maximum(volume, CT_PADDING_BELOW_HU))
    estimate: DegradationEstimate | None = None
    if request.estimate_degradation:
        estimate = (estimate_inplane(x, scale, weights_dir) if mode == "slice"
                    else estimate_slab(x, scale, thickness / dz))
    name, group, fallback_reason = choose_model(request.model, name, mode, scale, estimate,
                                                weights_dir)
    if fallback_reason:
        LOGGER.info("SR engine falls back to %s: %s", name, fallback_reason)
    model, version = load_model(name, mode, scale, weights_dir, group)
    adaptation: dict[str, float | str] | None = None
    if mode == "volume" and request.adapt_seconds > 0 and REGISTRY[name].learned:
        from .training import adapt_on_series

        adaptation = adapt_on_series(model, x, scale,
                                     adaptation_profiles(estimate, thickness / dz),
                                     request.adapt_seconds, device=device)
        version += "-adapted"
    fy, fx = factors_for(mode, scale)
    # Interpolation baselines are flip-equivariant: the ensemble would only cost time.
    ensemble = resolve_self_ensemble(mode, request.self_ensemble) and REGISTRY[name].learned
    extra: dict[str, object] = {"requested_model": request.model, "weights_group": group,
                                "intensity_mapping": {"offset": mapping.offset,
                                                      "scale": mapping.scale},
                                "self_ensemble": ensemble,
                                "self_ensemble_passes": (len(ensemble_variants(fy, fx))
                                                         if ensemble else 1)}

    def run(planes: np.ndarray) -> tuple[np.ndarray, int]:
        nonlocal device, fallback
        try:
            return _run(model, planes, fy, fx, device, request, ensemble)
        except torch.OutOfMemoryError:
            if device != "cuda":
                raise
            fallback, device = "CUDA out of memory", "cpu"
            torch.cuda.empty_cache()
            return _run(model, planes, fy, fx, device, request, ensemble)

    n = volume.shape[0]
    if mode == "slice":
        out, tiles = run(x)
        del x
        mapping.inverse_inplace(out)
        if padding is not None:
            for i in np.nonzero(padding.any(axis=(1, 2)))[0]:
                up = np.repeat(np.repeat(padding[i], scale, 0), scale, 1)
                out[i][up] = np.repeat(np.repeat(volume[i], scale, 0), scale, 1)[up]
        _clip_plausible(out, volume, modality)
        consistency = consistency_slice(out, volume, scale, mapping,
                                        operator=consistency_operator(estimate, mode))
        offsets = [i * dz for i in range(n)]
        contrib = [[i] for i in range(n)]
        out_spacing = (dz, dy / scale, dx / scale)
        out_thickness = thickness
    else:
        sag, tiles_s = run(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (X, Z*r, Y)
        cor, tiles_c = run(np.ascontiguousarray(x.transpose(1, 0, 2)))  # (Y, Z*r, X)
        fine = 0.5 * (sag.transpose(1, 2, 0) + cor.transpose(1, 0, 2))
        tiles = tiles_s + tiles_c
        centres, s = output_grid(n, dz, thickness, scale, request.output_spacing)
        fine_step = dz / scale
        fine_centres = (np.arange(n * scale) - (scale - 1) / 2) * fine_step
        if len(centres) == len(fine_centres) and np.allclose(centres, fine_centres, atol=1e-6):
            out = np.ascontiguousarray(fine, dtype=np.float32)
            extra["resampled"] = False
        else:
            out = cubic_resample_z(fine.astype(np.float32), (centres - fine_centres[0]) / fine_step)
            extra["resampled"] = True
        mapping.inverse_inplace(out)
        if padding is not None:
            near = np.clip(np.rint(centres / dz).astype(int), 0, n - 1)
            up = padding[near]
            out[up] = volume[near][up]
        _clip_plausible(out, volume, modality)
        consistency = consistency_volume(out, centres, s, volume, dz, thickness, mapping,
                                         consistency_operator(estimate, mode))
        offsets = [float(c) for c in centres]
        contrib = contributing(centres, s, n, dz, thickness)
        out_spacing = (s, dy, dx)
        out_thickness = s
    if fallback:
        extra["device_fallback"] = fallback
        LOGGER.warning("SR engine device fallback: %s", fallback)
    extra["tiles_per_plane"] = tiles
    extra["precision"] = ("mixed" if uses_mixed_precision(request.precision, device)
                          and REGISTRY[name].learned else "float32")
    return EnhanceResult(
        volume=np.ascontiguousarray(out, dtype=np.float32), spacing=out_spacing,
        slice_thickness=out_thickness, slice_offsets=offsets, contributing_slices=contrib,
        consistency=consistency, model_name=name, model_version=version, device=device,
        seconds=time.perf_counter() - t0, extra=extra, degradation=estimate,
        fallback_reason=fallback_reason, adaptation=adaptation)
