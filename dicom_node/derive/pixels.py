"""Pixel encoding: modality values to stored values, the Image Pixel module, the file meta."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from dicom_node import codes as c
from dicom_node.derive.elements import DerivationError, format_ds
from dicom_node.derive.options import DerivationOptions
from dicom_node.derive.series import SourceSeries
from sr_engine.api import EnhanceResult

#: Lowest CT number kept (HU): nothing in a patient is less dense than air (-1000 HU); scanners
#: store -1024 as their floor.  Interpolation undershoot below this (and below the source minimum)
#: is clipped; values above are never clipped.
CT_FLOOR_HU = -1024.0


#: MR magnitude signal is never negative: undershoot below 0 (or the source minimum) is clipped.
MR_FLOOR = 0.0


@dataclass(frozen=True)
class PixelEncoding:
    """How modality values were mapped to stored values."""

    stored: np.ndarray
    slopes: list[float]
    intercepts: list[float]
    pixel_representation: int
    bits_stored: int
    recomputed: bool
    clipped_voxels: int
    padding_value: int | None = None


def encode_pixels(
    source: SourceSeries, result: EnhanceResult, nearest: Sequence[int]
) -> PixelEncoding:
    """Round, clip to physical limits and map modality values to 16-bit stored values.

    Modality values are clipped only from below, to the physically meaningful floor
    (:data:`CT_FLOOR_HU` for CT, :data:`MR_FLOOR` for MR, or the source minimum when that is
    lower): interpolation and networks undershoot at sharp edges.  Nothing is clipped from above.
    The source's Rescale Slope/Intercept (of the nearest source slice) is kept when the stored
    values fit 16 bits with the source's Pixel Representation or the other one; otherwise one
    common slope/intercept is recomputed (unsigned) so that the full range is represented.
    """
    # float32 throughout (exact for integers up to 2**24): a 300-slice 1024x1024 output is
    # 1.2 GB per copy, so the arithmetic works in place on as few copies as possible.
    vol = np.asarray(result.volume, dtype=np.float32)
    floor = CT_FLOOR_HU if source.modality == "CT" else MR_FLOOR
    floor = min(floor, float(source.volume.min()))
    clipped = int(np.count_nonzero(vol < floor))
    vol = np.maximum(vol, np.float32(floor))
    slopes = [source.rescale_slopes[j] for j in nearest]
    intercepts = [source.rescale_intercepts[j] for j in nearest]
    if any(s == 0 for s in slopes):
        raise DerivationError("source Rescale Slope is 0")
    m = np.asarray(slopes, dtype=np.float32)[:, None, None]
    b = np.asarray(intercepts, dtype=np.float32)[:, None, None]
    if np.all(m == 1):
        stored = np.rint(vol)
        stored -= b
    else:
        stored = vol - b
        stored /= m
    np.rint(stored, out=stored)
    lo, hi = float(stored.min()), float(stored.max())
    ranges = {0: (0, 65535), 1: (-32768, 32767)}
    for pr in (source.pixel_representation, 1 - source.pixel_representation):
        rmin, rmax = ranges[pr]
        if rmin <= lo and hi <= rmax:
            bits = source.bits_stored if pr == source.pixel_representation else 16
            if pr == 0 and hi > 2**bits - 1:
                bits = 16
            if pr == 1 and (lo < -(2 ** (bits - 1)) or hi > 2 ** (bits - 1) - 1):
                bits = 16
            dtype = np.uint16 if pr == 0 else np.int16
            enc = PixelEncoding(stored.astype(dtype), slopes, intercepts, pr, bits, False, clipped)
            return _restore_padding(source, enc, nearest)
    if not source.has_rescale and source.modality != "CT":
        raise DerivationError(
            f"enhanced values {vol.min():.1f}..{vol.max():.1f} do not fit 16 bits and the source"
            " has no Rescale Slope/Intercept to recompute"
        )
    vmin, vmax = float(vol.min()), float(vol.max())
    slope = max(min(slopes), (vmax - vmin) / 65535.0)
    slope = float(format_number_as_ds(slope * (1 + 1e-6)))
    intercept = float(format_ds(math.floor(vmin)))
    new = np.clip(np.rint((vol - intercept) / slope), 0, 65535).astype(np.uint16)
    n = vol.shape[0]
    return PixelEncoding(new, [slope] * n, [intercept] * n, 0, 16, True, clipped)


def _output_padding_mask(
    source: SourceSeries, j: int, shape: tuple[int, int]
) -> np.ndarray:
    """Padding mask of one output slice: source slice ``j``'s mask, resampled by nearest pixel."""
    assert source.padding_mask is not None
    rows, cols = shape
    mask = source.padding_mask[j]
    src_rows, src_cols = mask.shape
    if rows % src_rows == 0 and cols % src_cols == 0:  # integer factors: plain repetition
        return mask.repeat(rows // src_rows, axis=0).repeat(cols // src_cols, axis=1)
    ri = np.minimum(((np.arange(rows) + 0.5) * src_rows / rows).astype(int), src_rows - 1)
    ci = np.minimum(((np.arange(cols) + 0.5) * src_cols / cols).astype(int), src_cols - 1)
    return mask[ri][:, ci]


def _restore_padding(
    source: SourceSeries, enc: PixelEncoding, nearest: Sequence[int]
) -> PixelEncoding:
    """Write the source's Pixel Padding Value back into the padding region of the output.

    The padding region is the nearest source pixel's.  When the padding value cannot be stored
    with the output's representation and bits, the region keeps the fill value it was enhanced
    with and no Pixel Padding Value is written.  Non-padding voxels that happen to equal the
    padding value are moved one step away from it, so that padding means padding only.
    """
    pad = source.padding_value
    if source.padding_mask is None or pad is None:
        return enc
    bits, pr = enc.bits_stored, enc.pixel_representation
    lo, hi = (0, 2**bits - 1) if pr == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if not lo <= pad <= hi:
        return enc
    stored = enc.stored
    moved = pad + 1 if pad < hi else pad - 1
    # slice by slice: a whole-series boolean mask of a 300 x 1024 x 1024 output is 300 MB per
    # temporary and memory-bound; one slice stays in cache
    for k, j in enumerate(nearest):
        mask = _output_padding_mask(source, j, stored.shape[1:])
        out = stored[k]
        collide = out == pad
        collide &= ~mask
        np.putmask(out, collide, moved)
        np.putmask(out, mask, pad)
    return PixelEncoding(stored, enc.slopes, enc.intercepts, pr, bits, enc.recomputed,
                         enc.clipped_voxels, pad)


def set_pixel_module(
    ds: Dataset, source: SourceSeries, enc: PixelEncoding, k: int, j: int, rows: int, cols: int
) -> None:
    """Image Pixel module, rescale and windowing of output slice ``k`` (nearest source ``j``)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = source.photometric_interpretation
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = enc.pixel_representation
    identity = enc.slopes[k] == 1 and enc.intercepts[k] == 0
    if source.modality == "CT" or enc.recomputed or (source.has_rescale and not identity):
        ds.RescaleIntercept = format_ds(enc.intercepts[k])
        ds.RescaleSlope = format_ds(enc.slopes[k])
        if source.modality == "CT" and not ds.get("RescaleType"):
            ds.RescaleType = "HU"
    centers, widths = source.window_centers[j], source.window_widths[j]
    if centers and widths and len(centers) == len(widths) and all(w >= 1 for w in widths):
        ds.WindowCenter = [format_ds(v) for v in centers] if len(centers) > 1 else format_ds(
            centers[0])
        ds.WindowWidth = [format_ds(v) for v in widths] if len(widths) > 1 else format_ds(
            widths[0])
    else:
        for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
            if keyword in ds:
                delattr(ds, keyword)
    if enc.padding_value is not None:
        ds.add_new(0x00280120, "US" if enc.pixel_representation == 0 else "SS",
                   enc.padding_value)  # Pixel Padding Value, in the stored representation
    pixels = np.ascontiguousarray(enc.stored[k]).astype("<" + enc.stored.dtype.str[1:])
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"


def set_file_meta(ds: Dataset, ts: UID, options: DerivationOptions) -> None:
    """File Meta Information, then encode the pixel data for compressed transfer syntaxes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = c.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = (c.IMPLEMENTATION_VERSION_PREFIX + options.software_version)[
        :16
    ]
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = ts
