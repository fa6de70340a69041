"""Enhance a series slab by slab: bounded memory for any series length.

:func:`sr_engine.inference.enhance_volume` holds the whole input and output volume.  A
:class:`SeriesEnhancer` makes the series-level decisions once (intensity mapping, degradation
estimate, model and weights, self-ensemble, the value range the output is clipped to) from
series statistics, then enhances slabs one at a time and accumulates the re-degradation check:

- slice mode: every slice is enhanced on its own, so a slab is any run of source slices; the
  caller reads it, enhances it with :meth:`SeriesEnhancer.enhance_slices`, and drops it.
- volume mode: the through-plane network sees whole z-lines, so the (thick-slice, small) input
  volume stays in memory and the *output* is produced in ranges of output slices
  (:meth:`SeriesEnhancer.enhance_output_range`).  Each range is computed from the input slices it
  needs plus a context of the network's receptive field on both sides, so a slab boundary gives
  the same voxels as the whole-volume path (within float rounding), the self-ensemble included.

:func:`slab_slices` chooses the slab length from a memory budget and the matrix size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .api import (
    ConsistencyReport,
    DegradationEstimate,
    EnhanceRequest,
    EnhanceResult,
    resolve_self_ensemble,
)
from .degrade import apply_inplane, degrade_inplane, profile_weights, slab_weights
from .errors import UnsupportedRequestError
from .estimate import (
    MAX_SLICES,
    adaptation_profiles,
    estimate_inplane,
    estimate_slab,
)
from .inference import (
    CT_PADDING_BELOW_HU,
    _run,
    choose_model,
    consistency_operator,
    contributing,
    cubic_resample_z,
    ensemble_variants,
    output_grid,
    resolve_device,
)
from .models import REGISTRY, check_scale, load_model, resolve_name
from .models.base import factors_for, receptive_field
from .normalise import IntensityMapping

LOGGER = logging.getLogger(__name__)

#: Bytes held per output voxel while a slice-mode slab is processed: the float32 output, the
#: tile accumulator, the rounded stored values and the encoded pixel data of its instances.
SLICE_BYTES_PER_OUTPUT_VOXEL = 16
#: Bytes held per input voxel of a slice-mode slab: the float32 slab, its network-unit copy,
#: the padding masks.
SLICE_BYTES_PER_INPUT_VOXEL = 12
#: Bytes held per fine output voxel of a volume-mode range: sagittal and coronal passes with
#: their self-ensemble accumulators and flipped copies, their fused mean, the encoded instances.
VOLUME_BYTES_PER_FINE_VOXEL = 40


def estimate_picks(num_slices: int, count: int = MAX_SLICES) -> list[int]:
    """Slices the in-plane estimate looks at (as :func:`sr_engine.estimate.series_features`).

    Given only these slices, in this order, the estimate equals the whole-series estimate.
    ``count`` other than the default: at most that many evenly spaced slices.
    """
    n = max(int(num_slices), 1)
    return [int(i) for i in np.unique(np.linspace(0, n - 1, min(n, count)).round()
                                      .astype(int))]


def plausible_range(vmin: float, vmax: float, modality: str) -> tuple[float, float]:
    """Range the enhanced values are clipped to, from the input's value range.

    10 % of the input range beyond either end; for CT the lower end is not above -1024 HU (or
    the input minimum), for non-negative MR it is 0.  Known before the first slab, so a derived
    series can choose one pixel encoding for all its instances.
    """
    margin = 0.1 * max(vmax - vmin, 1e-6)
    lo, hi = vmin - margin, vmax + margin
    if modality.upper() == "CT":
        lo = max(lo, min(vmin, -1024.0))
    elif vmin >= 0:
        lo = max(lo, 0.0)
    return lo, hi


def slab_slices(mode: str, scale: int, rows: int, cols: int, budget_mb: float,
                num_slices: int, context: int = 0) -> int:
    """Source slices per slab for a memory budget and matrix size.

    Parameters
    ----------
    mode, scale
        Task.
    rows, cols
        Source matrix.
    budget_mb
        Memory for the slab's arrays (``[engine] memory_budget_mb``), on top of the process
        (interpreter, libraries, model, network activations of one batch).
    num_slices
        Slices of the series (a slab is never longer).
    context
        Volume mode: input slices of context on each side of a slab (receptive field); a slab
        is at least four times as long, so the context never more than doubles the work.

    Returns
    -------
    int
        Slab length in source slices (>= 1).
    """
    budget = max(float(budget_mb), 1.0) * 2**20
    if mode == "slice":
        per = rows * cols * (SLICE_BYTES_PER_INPUT_VOXEL + SLICE_BYTES_PER_OUTPUT_VOXEL
                             * scale * scale)
        n = int(budget // per)
    else:
        per = rows * cols * scale * VOLUME_BYTES_PER_FINE_VOXEL
        n = int(budget // per) - 2 * context
        n = max(n, 4 * context)
    return int(min(max(n, 1), max(num_slices, 1)))


@dataclass(frozen=True)
class SeriesFacts:
    """What the engine must know of a series before its first slab.

    Attributes
    ----------
    num_slices, rows, cols
        Source shape.
    spacing
        ``(dz, dy, dx)`` in mm.
    slice_thickness
        Nominal thickness in mm (``<= 0``: taken as ``dz``).
    modality
        DICOM Modality.
    value_min, value_max
        Smallest and largest value of the whole series in modality units.
    mapping
        The series' intensity mapping (:func:`sr_engine.normalise.mapping_for` of the volume).
    """

    num_slices: int
    rows: int
    cols: int
    spacing: tuple[float, float, float]
    slice_thickness: float
    modality: str
    value_min: float
    value_max: float
    mapping: IntensityMapping


class SeriesEnhancer:
    """Series-level decisions once, then slabs (see the module docstring).

    Parameters
    ----------
    request
        What to do.
    facts
        The series statistics.
    sample
        Slice mode: the slices the in-plane estimate uses
        (:func:`sr_engine.estimate.series_features` picks, in modality units); volume mode:
        the whole input volume in modality units (kept: the output ranges are computed from it).
    weights_dir
        Optional weights folder.

    Raises
    ------
    UnsupportedRequestError
        Bad shape, mode, scale or device.
    UnknownModelError, WeightsNotFoundError
        The model cannot be loaded.
    """

    def __init__(self, request: EnhanceRequest, facts: SeriesFacts, sample: np.ndarray,
                 *, weights_dir: Path | None = None) -> None:
        t0 = time.perf_counter()
        self.request = request
        self.facts = facts
        mode, scale = request.mode, int(request.scale)
        check_scale(mode, scale)
        if mode == "volume" and facts.num_slices < 2:
            raise UnsupportedRequestError("volume mode needs at least two slices")
        self.mode, self.scale = mode, scale
        dz, dy, dx = (float(v) for v in facts.spacing)
        self.dz, self.dy, self.dx = dz, dy, dx
        self.thickness = (float(facts.slice_thickness)
                          if facts.slice_thickness and facts.slice_thickness > 0 else dz)
        self.device, self.device_fallback = resolve_device(request.device)
        name = resolve_name(request.model, self.device, mode, scale)
        self.mapping = facts.mapping
        self.ct = facts.modality.upper() == "CT"
        self.clip = plausible_range(facts.value_min, facts.value_max, facts.modality)
        sample = np.asarray(sample, dtype=np.float32)
        if not np.all(np.isfinite(sample)):
            raise UnsupportedRequestError("volume contains NaN or infinite values")
        x = self._forward(sample)
        estimate: DegradationEstimate | None = None
        if request.estimate_degradation:
            estimate = (estimate_inplane(x, scale, weights_dir) if mode == "slice"
                        else estimate_slab(x, scale, self.thickness / dz))
        name, group, self.fallback_reason = choose_model(request.model, name, mode, scale,
                                                         estimate, weights_dir)
        if self.fallback_reason:
            LOGGER.info("SR engine falls back to %s: %s", name, self.fallback_reason)
        self.model, version = load_model(name, mode, scale, weights_dir, group)
        self.adaptation: dict[str, float | str] | None = None
        if mode == "volume" and request.adapt_seconds > 0 and REGISTRY[name].learned:
            from .training import adapt_on_series

            self.adaptation = adapt_on_series(
                self.model, x, scale, adaptation_profiles(estimate, self.thickness / dz),
                request.adapt_seconds, device=self.device)
            version += "-adapted"
        self.name, self.version, self.estimate = name, version, estimate
        self.fy, self.fx = factors_for(mode, scale)
        self.ensemble = (resolve_self_ensemble(mode, request.self_ensemble)
                         and REGISTRY[name].learned)
        self.operator = consistency_operator(estimate, mode)
        self.context = receptive_field(self.model) // 2 + 2  # LR slices each side (volume mode)
        self.extra: dict[str, object] = {
            "requested_model": request.model, "weights_group": group,
            "intensity_mapping": {"offset": self.mapping.offset, "scale": self.mapping.scale},
            "self_ensemble": self.ensemble,
            "self_ensemble_passes": (len(ensemble_variants(self.fy, self.fx))
                                     if self.ensemble else 1),
            "streamed": True,
        }
        self.tiles = 0
        self._abs_sum = self._sq_sum = self._worst = 0.0
        self._count = 0
        n = facts.num_slices
        if mode == "slice":
            self.centres = np.arange(n) * dz
            self.out_spacing = (dz, dy / scale, dx / scale)
            self.out_thickness = self.thickness
            self.contrib = [[i] for i in range(n)]
        else:
            self.volume = sample
            self.x = x
            pad = sample < CT_PADDING_BELOW_HU if self.ct else None
            self.padding = pad if pad is not None and pad.any() else None
            centres, s = output_grid(n, dz, self.thickness, scale, request.output_spacing)
            self.centres, self.out_spacing, self.out_thickness = centres, (s, dy, dx), s
            self.contrib = contributing(centres, s, n, dz, self.thickness)
            fine_step = dz / scale
            self.fine_centres = (np.arange(n * scale) - (scale - 1) / 2) * fine_step
            self.resampled = not (len(centres) == len(self.fine_centres)
                                  and np.allclose(centres, self.fine_centres, atol=1e-6))
            self.extra["resampled"] = self.resampled
            self.positions = (centres - self.fine_centres[0]) / fine_step
            if self.operator is None:
                ov = slab_weights(centres, s, np.arange(n) * dz, self.thickness)
            else:
                ov = profile_weights(centres, s, np.arange(n) * dz, dz, self.operator)
            self.overlap = (ov / np.maximum(ov.sum(axis=1, keepdims=True), 1e-12)).astype(
                np.float32)
            self.redegraded = np.zeros((n, facts.rows, facts.cols), dtype=np.float32)
        self.seconds = time.perf_counter() - t0

    @property
    def interpolated(self) -> bool:
        """Whether the output is an interpolation (fallback or interpolation model), not SR."""
        from .tasks import is_interpolation

        return is_interpolation(self.name, self.fallback_reason)

    @property
    def num_outputs(self) -> int:
        """Output slices of the series."""
        return len(self.centres)

    def _forward(self, values: np.ndarray) -> np.ndarray:
        """Modality units to network units (CT padding below -1024 HU seen as air)."""
        if self.ct:
            values = np.maximum(values, np.float32(CT_PADDING_BELOW_HU))
        return self.mapping.forward(values)

    def _run(self, planes: np.ndarray) -> np.ndarray:
        """Upsample planes (network units), on the CPU should CUDA run out of memory."""
        try:
            out, tiles = _run(self.model, planes, self.fy, self.fx, self.device, self.request,
                              self.ensemble)
        except torch.OutOfMemoryError:
            if self.device != "cuda":
                raise
            self.device_fallback, self.device = "CUDA out of memory", "cpu"
            torch.cuda.empty_cache()
            out, tiles = _run(self.model, planes, self.fy, self.fx, self.device, self.request,
                              self.ensemble)
        self.tiles = max(self.tiles, tiles)
        return out

    def _clip(self, out: np.ndarray) -> None:
        """Clip enhanced values (in place) to :func:`plausible_range` of the series."""
        np.clip(out, np.float32(self.clip[0]), np.float32(self.clip[1]), out=out)

    def enhance_slices(self, volume: np.ndarray) -> np.ndarray:
        """Slice mode: enhance a slab of source slices (modality units, ``(k, y, x)``).

        Returns
        -------
        numpy.ndarray
            float32 ``(k, y*scale, x*scale)`` in modality units, clipped to the plausible range.
        """
        if self.mode != "slice":
            raise UnsupportedRequestError("enhance_slices is for slice mode")
        volume = np.asarray(volume, dtype=np.float32)
        if not np.all(np.isfinite(volume)):
            raise UnsupportedRequestError("volume contains NaN or infinite values")
        scale = self.scale
        out = self._run(self._forward(volume))
        self.mapping.inverse_inplace(out)
        if self.ct:
            for i in range(volume.shape[0]):
                pad = volume[i] < CT_PADDING_BELOW_HU
                if pad.any():
                    up = np.repeat(np.repeat(pad, scale, 0), scale, 1)
                    out[i][up] = np.repeat(np.repeat(volume[i], scale, 0), scale, 1)[up]
        self._clip(out)
        self._check_slices(out, volume)
        return out

    def _check_slices(self, output: np.ndarray, volume: np.ndarray, batch: int = 4) -> None:
        """Accumulate the in-plane re-degradation check of a slab."""
        h, w = volume.shape[1:]
        s = self.scale
        with torch.inference_mode():
            for i in range(0, output.shape[0], batch):
                t = torch.from_numpy(np.ascontiguousarray(output[i:i + batch, : h * s, : w * s]))
                red = (degrade_inplane(t.unsqueeze(1), s) if self.operator is None
                       else apply_inplane(t.unsqueeze(1), s, self.operator))
                err = np.abs(red.squeeze(1).numpy().astype(np.float64) - volume[i:i + batch])
                self._abs_sum += float(err.sum())
                self._sq_sum += float((err ** 2).sum())
                self._worst = max(self._worst, float(err.max()))
        self._count += volume.size

    def output_ranges(self, budget_mb: float) -> Iterator[tuple[int, int]]:
        """Volume mode: ranges ``[k0, k1)`` of output slices within ``budget_mb``."""
        n = self.facts.num_slices
        per = slab_slices("volume", self.scale, self.facts.rows, self.facts.cols, budget_mb, n,
                          self.context)
        step = max(1, int(round(per * len(self.centres) / n)))
        for k0 in range(0, len(self.centres), step):
            yield k0, min(len(self.centres), k0 + step)

    def enhance_output_range(self, k0: int, k1: int) -> np.ndarray:
        """Volume mode: output slices ``k0 .. k1-1`` (float32, modality units).

        The sagittal and coronal passes run on the input slices the range needs plus
        :attr:`context` slices on each side (none beyond the volume's ends), so their cropped
        output equals the whole-volume passes.
        """
        if self.mode != "volume":
            raise UnsupportedRequestError("enhance_output_range is for volume mode")
        r, n = self.scale, self.facts.num_slices
        nf = n * r
        if self.resampled:
            base = np.floor(self.positions[k0:k1]).astype(int)
            f0 = int(np.clip(base.min() - 1, 0, nf - 1))
            f1 = int(np.clip(base.max() + 2, 0, nf - 1)) + 1
        else:
            f0, f1 = k0, k1
        i0 = max(0, f0 // r - self.context)
        i1 = min(n, (f1 - 1) // r + 1 + self.context)
        x = self.x[i0:i1]
        sag = self._run(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (X, Z*r, Y)
        a, b = f0 - i0 * r, f1 - i0 * r
        sag = np.ascontiguousarray(sag[:, a:b])
        cor = self._run(np.ascontiguousarray(x.transpose(1, 0, 2)))  # (Y, Z*r, X)
        cor = np.ascontiguousarray(cor[:, a:b])
        fine = 0.5 * (sag.transpose(1, 2, 0) + cor.transpose(1, 0, 2))
        del sag, cor
        if self.resampled:
            out = _resample_part(fine.astype(np.float32), self.positions[k0:k1] - f0, f0, nf)
        else:
            out = np.ascontiguousarray(fine, dtype=np.float32)
        del fine
        self.mapping.inverse_inplace(out)
        centres = self.centres[k0:k1]
        if self.padding is not None:
            near = np.clip(np.rint(centres / self.dz).astype(int), 0, n - 1)
            for k, j in enumerate(near):
                up = self.padding[j]
                if up.any():
                    out[k][up] = self.volume[j][up]
        self._clip(out)
        # the re-degradation check: each input slab is the weighted mean of its output slices
        self.redegraded += np.tensordot(self.overlap[:, k0:k1], out, axes=(1, 0))
        return out

    def finish(self) -> EnhanceResult:
        """The facts of the enhanced series (after the last slab), its check included.

        Returns
        -------
        EnhanceResult
            ``volume`` is a read-only zero-stride view with the output shape: the voxels were
            handed out slab by slab.
        """
        scale = self.scale
        if self.mode == "slice":
            count = max(self._count, 1)
            mse = self._sq_sum / count
            psnr = float("inf") if mse == 0 else 10 * math.log10(self.mapping.scale ** 2 / mse)
            consistency = ConsistencyReport(self._abs_sum / count, self._worst, psnr)
            shape = (self.facts.num_slices, self.facts.rows * scale, self.facts.cols * scale)
        else:
            err = np.abs(self.redegraded.astype(np.float64) - self.volume.astype(np.float64))
            mse = float(np.mean(err ** 2)) if err.size else 0.0
            psnr = float("inf") if mse == 0 else 10 * math.log10(self.mapping.scale ** 2 / mse)
            consistency = ConsistencyReport(float(err.mean()), float(err.max()), psnr)
            del err
            shape = (len(self.centres), self.facts.rows, self.facts.cols)
        return self.describe(consistency, shape)

    def describe(self, consistency: ConsistencyReport | None = None,
                 shape: tuple[int, int, int] | None = None) -> EnhanceResult:
        """The series' facts before (or after) the slabs: geometry, model, provenance.

        Before the last slab ``consistency`` is not known yet (NaN figures).
        """
        if shape is None:
            shape = ((self.facts.num_slices, self.facts.rows * self.scale,
                      self.facts.cols * self.scale) if self.mode == "slice"
                     else (len(self.centres), self.facts.rows, self.facts.cols))
        extra = dict(self.extra)
        extra["tiles_per_plane"] = self.tiles
        if self.device_fallback:
            extra["device_fallback"] = self.device_fallback
        nan = float("nan")
        return EnhanceResult(
            volume=np.broadcast_to(np.float32(0), shape),
            spacing=self.out_spacing, slice_thickness=self.out_thickness,
            slice_offsets=[float(c) for c in self.centres], contributing_slices=self.contrib,
            consistency=consistency or ConsistencyReport(nan, nan, nan),
            model_name=self.name, model_version=self.version, device=self.device,
            seconds=self.seconds, extra=extra, degradation=self.estimate,
            fallback_reason=self.fallback_reason, adaptation=self.adaptation)


def _resample_part(fine: np.ndarray, positions: np.ndarray, f0: int, nf: int) -> np.ndarray:
    """:func:`cubic_resample_z` of a part ``[f0, f0 + len(fine))`` of ``nf`` fine slices.

    Indices are clamped to the whole series' ends, as the whole-volume resampling clamps them.
    """
    return cubic_resample_z(fine, positions, offset=f0, total=nf)
