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

import math
import uuid
from collections.abc import Callable
from dataclasses import replace
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
    DERIVATION_TAIL_CHARS,
    REPLACED_TAGS,
    acquisition_item,
    copy_header,
    derivation_head,
    derivation_tail,
    processing_item,
    series_description,
    set_derivation,
    set_identity,
    strip_source_header,
    utc_offset,
)
from dicom_node.derive.options import DerivationOptions
from dicom_node.derive.pixels import (
    CT_FLOOR_HU,
    choose_encoding,
    encode_slab,
    set_file_meta,
    set_pixel_module,
)
from dicom_node.derive.series import SourceSeries
from sr_engine.api import ConsistencyReport, EnhanceResult
from sr_engine.tasks import MODES

__all__ = ["CT_FLOOR_HU", "DerivationError", "DerivationOptions", "DerivedSeriesBuilder",
           "build_derived_series"]


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
    if not _streamed(result) and not np.all(np.isfinite(vol)):
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


def _streamed(result: EnhanceResult) -> bool:
    """Whether the result only describes a streamed output (its volume a zero-stride view)."""
    return result.volume.size > 0 and not any(result.volume.strides)


#: Marker of the space kept for the series-level figures in a streamed series' instances.
PENDING_MARK = "SRNODE-PENDING-"


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
    builder = DerivedSeriesBuilder(source, result, options)
    out = builder.build(0, result.volume)
    return sorted(out, key=lambda d: int(d.InstanceNumber))


class DerivedSeriesBuilder:
    """Builds a derived series slab by slab; the series-level header once.

    Everything the instances share (identity, description, derivation, equipment, pixel
    encoding) is made once in the constructor; :meth:`build` adds only what changes per
    instance (the source slice's own header, UIDs, numbers, position, pixel data).

    For a streamed series (``result`` from :meth:`sr_engine.stream.SeriesEnhancer.describe`,
    its consistency not known yet), the series-level figures of the Derivation Description and
    the ``(CHECK)`` suffix of the Series Description are left as reserved space, filled in every
    written file by :func:`dicom_node.derive.files.complete_series` before it is published.

    Parameters
    ----------
    source, result, options
        As :func:`build_derived_series`.
    value_range
        Streamed series: the range the engine clips the output to
        (:func:`sr_engine.stream.plausible_range`); the pixel encoding is chosen from it.
        ``None``: from ``result.volume``.

    Raises
    ------
    DerivationError
        As :func:`build_derived_series`.
    """

    def __init__(self, source: SourceSeries, result: EnhanceResult, options: DerivationOptions,
                 *, value_range: tuple[float, float] | None = None) -> None:
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
        self.source, self.result, self.options, self.ts = source, result, options, ts
        self.mode, self.scale, self.num_instances = mode, scale, nz
        self.streamed = _streamed(result)
        self.nearest = nearest_source_slices(source_indices(source, result, mode),
                                             source.num_slices)
        if value_range is not None:
            bounds = np.tile(np.asarray(value_range, dtype=np.float64), (nz, 1))
        else:
            vol = result.volume
            bounds = np.stack([vol.min(axis=(1, 2)), vol.max(axis=(1, 2))], axis=1)
        self.encoding = choose_encoding(source, self.nearest, bounds)
        self.positions = output_positions(source, result, mode)
        self.between = spacing_between_slices(self.positions, source.normal)
        # Slice mode keeps the source's thickness, and an empty (Type 2) one stays empty.
        self.thickness = (
            None if mode == "slice" and not source.slice_thickness_present
            else result.slice_thickness
        )
        self.numbers = instance_numbers(source, nz)
        ds0 = source.datasets[0]
        self.series_number = int(ds0.get("SeriesNumber") or 0) + options.series_number_offset
        if not -(2**31) <= self.series_number <= c.IS_MAX:
            raise DerivationError(f"series number {self.series_number} is outside the IS range")
        self.series_uid = new_uid(options.uid_root)
        self.pending = uuid.uuid4().hex if self.streamed else ""
        if self.streamed:
            # room for the gate's suffix, filled by complete_series (spaces when not needed)
            plain = replace(options, description_suffix="")
            text = series_description(ds0, plain, mode, scale)
            room = c.LO_MAX_CHARS - CHECK_SUFFIX_CHARS
            self.description = text[:room].rstrip()
            self.written_description = self.description + " " * CHECK_SUFFIX_CHARS
        else:
            self.description = series_description(ds0, options, mode, scale)
            self.written_description = self.description
        now = options.now or datetime.now(UTC)
        tz = utc_offset(ds0)
        self.local_now = now.astimezone(tz) if (tz is not None and now.tzinfo is not None) else now
        self.units = "HU" if source.modality == "CT" else "signal units"
        self.head = derivation_head(result, mode, scale, options)
        self.processing = processing_item(options, now, result, mode, scale)
        self.slice_locs = output_slice_locations(source, result, mode)
        self.clipped_voxels = 0

    def derivation(self, consistency: ConsistencyReport | None = None) -> str:
        """Derivation Description: final, or with reserved space for the figures (streamed)."""
        if consistency is None:
            if self.streamed:
                return self.head + " " + pending_text(self.pending, DERIVATION_TAIL_CHARS)
            consistency = self.result.consistency
        tail = derivation_tail(consistency, self.units, self.clipped_voxels,
                               self.encoding.recomputed)
        return self.head + " " + tail

    def completion(self, consistency: ConsistencyReport, suffix: str = "") -> dict[bytes, bytes]:
        """Streamed series: reserved bytes of every written instance and their final bytes.

        Parameters
        ----------
        consistency
            The series' re-degradation check (known after the last slab).
        suffix
            Series Description suffix (the gate's ``" (CHECK)"``), at most
            :data:`CHECK_SUFFIX_CHARS` characters.

        Returns
        -------
        dict
            Old bytes -> new bytes of the same length, for
            :func:`dicom_node.derive.files.complete_series`.
        """
        if len(suffix) > CHECK_SUFFIX_CHARS:
            raise DerivationError(f"description suffix {suffix!r} is longer than the room kept")
        tail = derivation_tail(consistency, self.units, self.clipped_voxels,
                               self.encoding.recomputed)
        out = {pending_text(self.pending, DERIVATION_TAIL_CHARS).encode():
               tail.ljust(DERIVATION_TAIL_CHARS).encode()}
        if suffix:
            old = self.written_description
            out[_lo_value(old)] = _lo_value((self.description + suffix).ljust(len(old)))
        return out

    def build(self, start: int, voxels: np.ndarray,
              padding: Callable[[int], np.ndarray | None] | None = None) -> list[Dataset]:
        """Instances of output slices ``start .. start+len(voxels)-1`` (in slice order).

        Parameters
        ----------
        start
            Index of the first output slice.
        voxels
            float32 ``(k, rows, cols)`` modality values of those slices (may be changed).
        padding
            Source slice index -> its padding mask; default: :attr:`SourceSeries.padding_mask`.

        Returns
        -------
        list of pydicom.dataset.Dataset
            One instance per slice, with File Meta Information.
        """
        source, enc = self.source, self.encoding
        if padding is None:
            mask = source.padding_mask

            def padding(j: int) -> np.ndarray | None:
                return None if mask is None else mask[j]

        stored, clipped = encode_slab(enc, voxels, start, self.nearest, padding)
        self.clipped_voxels += clipped
        derivation = self.derivation() if self.streamed else None
        _, dy, dx = (float(v) for v in self.result.spacing)
        out: list[Dataset] = []
        for i in range(stored.shape[0]):
            k = start + i
            j = self.nearest[k]
            src_ds = source.datasets[j]
            if source.is_enhanced:
                ref = source.source_refs[j]
                base = classic_from_enhanced(src_ds, (ref.frame_number or 1) - 1,
                                             source.modality)
                strip_source_header(base)
            else:
                base = copy_header(src_ds, REPLACED_TAGS)
            ds = base
            set_identity(ds, source, self.series_uid, self.series_number, self.written_description,
                         self.numbers[k], self.options, self.local_now)
            set_derivation(ds, source, self.result.contributing_slices[k], "",
                           acquisition_item(src_ds), self.processing)
            set_image_plane(
                ds, source, self.positions[k], (dy, dx), self.thickness, self.between,
                None if self.slice_locs is None else self.slice_locs[k],
            )
            set_pixel_module(ds, source, enc, k, j, stored[i])
            out.append(ds)
        if derivation is None:
            derivation = self.derivation()
        for ds in out:
            ds.DerivationDescription = derivation
            set_file_meta(ds, self.ts, self.options)
        return out


#: Characters kept at the end of a streamed series' Series Description for the gate's suffix.
CHECK_SUFFIX_CHARS = 8


def _lo_value(text: str) -> bytes:
    """Series Description (0008,103E) as written in explicit VR little endian.

    Tag, VR, length and the value padded to even length: the bytes
    :func:`dicom_node.derive.files.complete_series` looks for.
    """
    value = text.encode()
    if len(value) % 2:
        value += b" "
    return b"\x08\x00\x3e\x10LO" + len(value).to_bytes(2, "little") + value


def pending_text(token: str, length: int) -> str:
    """Reserved text of ``length`` characters: a marker unique to the series, then spaces."""
    return (PENDING_MARK + token).ljust(length)


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
