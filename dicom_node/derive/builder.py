r"""Build the new DERIVED series from a loaded source series and an enhanced volume (no I/O).

:func:`build_derived_series` returns one classic single-frame CT Image Storage (for CT) or MR Image
Storage (for MR) instance per output slice.  The datasets are valid by construction: every
requirement below is applied here, and anything that cannot be made compliant raises
``ValueError``.

- Identity: new Series Instance UID, new SOP Instance UIDs, Series Number = source + offset;
  Study Instance UID, Patient and Study modules and Frame of Reference UID are kept.
- Labelling: Image Type ``DERIVED\\SECONDARY\\<AXIAL|OTHER>\\SRNODE``, Derivation Description,
  Derivation Code Sequence (DCM 113085 Spatial resampling), Source Image Sequence listing every
  contributing source instance (DCM 121322, with Referenced Frame Number for multi-frame sources),
  Related Series Sequence (DCM 121323), Common Instance Reference (Referenced Series Sequence),
  Contributing Equipment (DCM 109101 for the scanner, DCM 109102 for srnode).
- Geometry: Rows/Columns and Pixel Spacing from the result; Image Position (Patient) keeps the
  field of view (the first pixel centre moves by half the spacing difference along the row and
  column directions); in volume mode slices are placed at ``slice_offsets`` along the normal.
- Pixels: rounded, stored with the source's Rescale Slope/Intercept where they fit 16 bits,
  otherwise with a switched Pixel Representation or, as a last resort, a recomputed rescale.

Enhanced (multi-frame) sources also produce classic single-frame instances: every viewer, PACS
and workstation displays CT/MR Image Storage, whereas multi-frame support is still patchy, and one
instance per slice lets a receiver start showing the series before it is complete.  The Source
Image Sequence points to the enhanced source instance with the frame number of each contributing
frame.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node import codes as c
from dicom_node.derive.elements import DerivationError, check_uid_root, new_uid
from dicom_node.derive.enhanced import classic_from_enhanced
from dicom_node.derive.geometry import (
    nearest_source_slices,
    output_positions,
    output_slice_locations,
    set_image_plane,
    source_indices,
    spacing_between_slices,
)
from dicom_node.derive.identity import (
    acquisition_item,
    copy_header,
    derivation_description,
    processing_item,
    series_description,
    set_derivation,
    set_identity,
    strip_source_header,
    utc_offset,
)
from dicom_node.derive.options import DerivationOptions
from dicom_node.derive.pixels import CT_FLOOR_HU, encode_pixels, set_file_meta, set_pixel_module
from dicom_node.derive.series import SourceSeries
from sr_engine.api import EnhanceResult
from sr_engine.tasks import MODES

__all__ = ["CT_FLOOR_HU", "DerivationError", "DerivationOptions", "build_derived_series"]


def _infer_mode_scale(
    source: SourceSeries, result: EnhanceResult, options: DerivationOptions
) -> tuple[str, int]:
    """Return the processing mode and scale, from the options or the result's geometry."""
    nz = result.volume.shape[0]
    src_off = np.asarray(source.slice_offsets)
    grid = np.arange(source.num_slices) * source.spacing[0]
    mode = options.mode
    if mode is None:
        same = (
            nz == source.num_slices
            and len(result.slice_offsets) == nz
            and (
                np.allclose(result.slice_offsets, src_off, atol=1e-3)
                or np.allclose(result.slice_offsets, grid, atol=1e-3)
            )
        )
        mode = "slice" if same else "volume"
    if mode not in MODES:
        raise DerivationError(f"unknown mode {mode!r}")
    scale = options.scale
    if scale is None:
        ratio = (
            source.spacing[2] / result.spacing[2]
            if mode == "slice"
            else source.spacing[0] / result.spacing[0]
        )
        scale = max(1, round(ratio))
    return mode, int(scale)


def _check_result(source: SourceSeries, result: EnhanceResult, mode: str) -> None:
    """Refuse results whose shape, spacing, offsets or contributions do not add up."""
    vol = result.volume
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise DerivationError(f"result volume must be (z, y, x), got shape {vol.shape}")
    nz = vol.shape[0]
    if not np.all(np.isfinite(vol)):
        raise DerivationError("result volume contains NaN or infinite values")
    if len(result.slice_offsets) != nz or len(result.contributing_slices) != nz:
        raise DerivationError(
            f"result has {nz} slices but {len(result.slice_offsets)} offsets and "
            f"{len(result.contributing_slices)} contribution lists"
        )
    if any(s <= 0 or not math.isfinite(s) for s in result.spacing) or result.slice_thickness <= 0:
        raise DerivationError(f"invalid result spacing {result.spacing} / thickness")
    for k, contrib in enumerate(result.contributing_slices):
        if not contrib or any(not 0 <= i < source.num_slices for i in contrib):
            raise DerivationError(f"output slice {k}: invalid contributing slices {contrib}")
    if mode == "slice" and nz != source.num_slices:
        raise DerivationError(
            f"slice mode needs one output slice per source slice ({source.num_slices}), got {nz}"
        )


def build_derived_series(
    source: SourceSeries, result: EnhanceResult, options: DerivationOptions
) -> list[Dataset]:
    """Build the derived series: one classic CT/MR image instance per output slice.

    Parameters
    ----------
    source
        The loaded source series.
    result
        The enhanced volume with its geometry and provenance.
    options
        Identity, labelling and encoding options.

    Returns
    -------
    list of pydicom.dataset.Dataset
        The instances in Instance Number order (1..n), each with File Meta Information; the
        numbers run along the slice normal in the same direction as the source's.

    Raises
    ------
    DerivationError
        (a ``ValueError``) when the result does not fit the source, an option is invalid or the
        values cannot be represented.
    """
    if source.modality not in c.CLASSIC_IMAGE_STORAGE:
        raise DerivationError(f"modality {source.modality!r} is not CT or MR")
    ts = UID(options.transfer_syntax)
    if ts not in c.OUTPUT_TRANSFER_SYNTAXES:
        raise DerivationError(f"unsupported output transfer syntax {ts}")
    check_uid_root(options.uid_root)
    mode, scale = _infer_mode_scale(source, result, options)
    _check_result(source, result, mode)
    nz, rows, cols = result.volume.shape
    if rows > 65535 or cols > 65535:
        raise DerivationError(f"matrix {rows}x{cols} exceeds the US range of Rows/Columns")

    nearest = nearest_source_slices(source_indices(source, result, mode), source.num_slices)
    enc = encode_pixels(source, result, nearest)

    dz, dy, dx = (float(v) for v in result.spacing)
    positions = output_positions(source, result, mode)
    between = spacing_between_slices(positions, source.normal)
    # Slice mode keeps the source's thickness, and an empty (Type 2) one stays empty.
    thickness = (
        None if mode == "slice" and not source.slice_thickness_present
        else result.slice_thickness
    )
    numbers = instance_numbers(source, nz)

    ds0 = source.datasets[0]
    series_number = int(ds0.get("SeriesNumber") or 0) + options.series_number_offset
    if not -(2**31) <= series_number <= c.IS_MAX:
        raise DerivationError(f"series number {series_number} is outside the IS range")
    series_uid = new_uid(options.uid_root)
    description = series_description(ds0, options, mode, scale)
    now = options.now or datetime.now(UTC)
    tz = utc_offset(ds0)
    local_now = now.astimezone(tz) if (tz is not None and now.tzinfo is not None) else now
    units = "HU" if source.modality == "CT" else "signal units"
    derivation = derivation_description(result, mode, scale, enc, units, options)
    processing = processing_item(options, now, result, mode, scale)

    slice_locs = output_slice_locations(source, result, mode)

    headers: dict[int, Dataset] = {}
    # a source header shared by several output slices (volume mode) is copied for each but the
    # last; in slice mode every header is used once and never copied twice
    uses = Counter(nearest)
    out: list[Dataset] = []
    for k in range(nz):
        j = nearest[k]
        if j not in headers:
            src_ds = source.datasets[j]
            ref = source.source_refs[j]
            if source.is_enhanced:
                frame = (ref.frame_number or 1) - 1
                base = classic_from_enhanced(src_ds, frame, source.modality)
            else:
                base = copy_header(src_ds)
            strip_source_header(base)
            headers[j] = base
        uses[j] -= 1
        ds = copy.deepcopy(headers[j]) if uses[j] else headers.pop(j)
        acquisition = acquisition_item(source.datasets[j])
        set_identity(
            ds, source, series_uid, series_number, description, numbers[k], options, local_now
        )
        set_derivation(
            ds, source, result.contributing_slices[k], derivation, acquisition, processing
        )
        set_image_plane(
            ds, source, positions[k], (dy, dx), thickness, between,
            None if slice_locs is None else slice_locs[k],
        )
        set_pixel_module(ds, source, enc, k, j, rows, cols)
        set_file_meta(ds, ts, options)
        out.append(ds)
    return sorted(out, key=lambda d: int(d.InstanceNumber))


def instance_numbers(source: SourceSeries, nz: int) -> list[int]:
    """Instance Number of each output slice (in slice order), running as the source's run.

    Output slices are ordered along the slice normal.  When the source's Instance Numbers (or
    frame numbers) decrease along the normal (e.g. a head-first CT numbered from the head down),
    the derived numbers do too, so both series scroll in the same anatomical direction.
    """
    known = [n for n in source.instance_numbers if n is not None]
    steps = np.sign(np.diff(known)) if len(known) > 1 else np.zeros(0)
    descending = int(np.count_nonzero(steps < 0)) > int(np.count_nonzero(steps > 0))
    return [nz - k for k in range(nz)] if descending else [k + 1 for k in range(nz)]
