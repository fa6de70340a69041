"""Geometry of the derived slices: positions, Slice Location and the Image Plane module.

Every output slice is placed from the actual source positions, never from a regular grid built
from the median gap.  The engine works on a regular grid: source slice ``i`` sits at ``i * dz``
(``dz`` the series' median gap), so an output offset ``o`` is the fractional source index
``o / dz``.  That index is mapped back onto the real positions by linear interpolation between the
two neighbouring source slices (linear extrapolation beyond the first or last slice).  Slice mode
keeps each source slice's own position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.derive.elements import format_ds
from dicom_node.derive.series import SourceSeries
from sr_engine.api import EnhanceResult

#: Largest deviation (mm) of output gaps from their mean still written as Spacing Between Slices.
UNIFORM_GAP_ATOL_MM = 0.01


def set_image_plane(
    ds: Dataset, source: SourceSeries, position: np.ndarray, pixel_spacing: tuple[float, float],
    slice_thickness: float | None, spacing_between_slices: float | None,
    slice_location: float | None,
) -> None:
    """Image Plane module of one output slice.

    ``slice_thickness`` ``None`` writes an empty Slice Thickness (Type 2: the source had none);
    ``spacing_between_slices`` and ``slice_location`` ``None`` leave those attributes out.
    """
    ds.ImagePositionPatient = [format_ds(v) for v in position]
    ds.ImageOrientationPatient = [format_ds(v) for v in source.orientation]
    ds.PixelSpacing = [format_ds(pixel_spacing[0]), format_ds(pixel_spacing[1])]
    ds.SliceThickness = None if slice_thickness is None else format_ds(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = format_ds(spacing_between_slices)
    if slice_location is not None:
        ds.SliceLocation = format_ds(slice_location)


def source_indices(source: SourceSeries, result: EnhanceResult, mode: str) -> np.ndarray:
    """Fractional source slice index of every output slice.

    Slice mode: output ``k`` is source slice ``k``.  Volume mode: the engine's offset divided by
    the grid spacing it was given (the source's median gap).
    """
    if mode == "slice":
        return np.arange(len(result.slice_offsets), dtype=np.float64)
    dz = float(source.spacing[0])
    return np.asarray(result.slice_offsets, dtype=np.float64) / dz


def _interpolate(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Linearly interpolate per-slice ``values`` (``(n, ...)``) at fractional ``index``.

    Beyond the first or last slice the end gap is extrapolated; a single slice is returned as is.
    """
    n = values.shape[0]
    if n == 1:
        return np.repeat(values[:1], len(index), axis=0)
    i0 = np.clip(np.floor(index).astype(int), 0, n - 2)
    w = (index - i0).reshape((-1,) + (1,) * (values.ndim - 1))
    return values[i0] * (1 - w) + values[i0 + 1] * w


def output_positions(source: SourceSeries, result: EnhanceResult, mode: str) -> np.ndarray:
    """Image Position (Patient) of every output slice, ``(n, 3)`` in mm.

    The field of view is kept: the first pixel centre moves by half the spacing difference
    along the row and column directions.  Slice mode keeps each source position; volume mode
    interpolates the real source positions at each output slice's fractional source index.
    """
    row_dir = np.asarray(source.orientation[:3])
    col_dir = np.asarray(source.orientation[3:])
    _, dy, dx = (float(v) for v in result.spacing)
    shift = row_dir * 0.5 * (dx - source.spacing[2]) + col_dir * 0.5 * (dy - source.spacing[1])
    if mode == "slice":
        return source.positions + shift
    if source.num_slices == 1:
        return np.stack(
            [source.positions[0] + off * source.normal + shift for off in result.slice_offsets]
        )
    return _interpolate(source.positions, source_indices(source, result, mode)) + shift


def output_slice_locations(
    source: SourceSeries, result: EnhanceResult, mode: str
) -> list[float] | None:
    """Slice Location of every output slice, or ``None`` to leave it out.

    Kept only when the source's Slice Location follows the position along the normal; then each
    output slice gets the source's value at its real position (its own slice in slice mode).
    """
    src_locs = source.slice_locations or [ds.get("SliceLocation") for ds in source.datasets]
    if source.is_enhanced or any(v in (None, "") for v in src_locs):
        return None
    locs = np.asarray([float(v) for v in src_locs])  # type: ignore[arg-type]
    offsets = np.asarray(source.slice_offsets)
    if not np.allclose(locs - locs[0], offsets, atol=0.01):
        return None
    if mode == "slice":
        return [float(v) for v in locs]
    positions = output_positions(source, result, mode)
    return [float(locs[0] + (p - source.positions[0]) @ source.normal) for p in positions]


def spacing_between_slices(positions: np.ndarray, normal: np.ndarray) -> float | None:
    """Centre-to-centre spacing of the output slices when uniform, else ``None``."""
    if len(positions) < 2:
        return None
    gaps = np.abs(np.diff(positions @ normal))
    mean = float(gaps.mean())
    if mean <= 0 or float(np.max(np.abs(gaps - mean))) > UNIFORM_GAP_ATOL_MM:
        return None
    return mean


def nearest_source_slices(indices: Sequence[float] | np.ndarray, n: int) -> list[int]:
    """Nearest source slice of every fractional source index."""
    return [int(np.clip(np.rint(i), 0, n - 1)) for i in indices]
