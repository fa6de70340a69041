"""Geometry of the derived slices: positions, Slice Location and the Image Plane module."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.derive.elements import format_ds
from dicom_node.derive.series import SourceSeries
from sr_engine.api import EnhanceResult


def set_image_plane(
    ds: Dataset, source: SourceSeries, position: np.ndarray, pixel_spacing: tuple[float, float],
    result: EnhanceResult, nz: int, slice_location: float | None,
) -> None:
    """Image Plane module of one output slice."""
    ds.ImagePositionPatient = [format_ds(v) for v in position]
    ds.ImageOrientationPatient = [format_ds(v) for v in source.orientation]
    ds.PixelSpacing = [format_ds(pixel_spacing[0]), format_ds(pixel_spacing[1])]
    ds.SliceThickness = format_ds(result.slice_thickness)
    if nz > 1:
        ds.SpacingBetweenSlices = format_ds(result.spacing[0])
    if slice_location is not None:
        ds.SliceLocation = format_ds(slice_location)


def output_positions(source: SourceSeries, result: EnhanceResult, mode: str) -> np.ndarray:
    """Image Position (Patient) of every output slice, ``(n, 3)`` in mm.

    The field of view is kept: the first pixel centre moves by half the spacing difference
    along the row and column directions.  Slice mode keeps each source position; volume mode
    places slices at the result's ``slice_offsets`` along the normal from the first source slice.
    """
    row_dir = np.asarray(source.orientation[:3])
    col_dir = np.asarray(source.orientation[3:])
    _, dy, dx = (float(v) for v in result.spacing)
    shift = row_dir * 0.5 * (dx - source.spacing[2]) + col_dir * 0.5 * (dy - source.spacing[1])
    if mode == "slice":
        return source.positions + shift
    return np.stack(
        [source.positions[0] + off * source.normal + shift for off in result.slice_offsets]
    )


def output_slice_locations(source: SourceSeries, result: EnhanceResult) -> list[float] | None:
    """Slice Location of every output slice, or ``None`` to leave it out.

    Recomputed only when the source's Slice Location follows the position along the normal.
    """
    src_locs = [ds.get("SliceLocation") for ds in source.datasets]
    if source.is_enhanced or any(v in (None, "") for v in src_locs):
        return None
    locs = np.asarray([float(v) for v in src_locs])  # type: ignore[arg-type]
    if not np.allclose(locs - locs[0], np.asarray(source.slice_offsets), atol=0.01):
        return None
    return [float(locs[0] + off) for off in result.slice_offsets]
