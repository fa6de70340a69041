"""Pixel encoding: modality values to stored values, the Image Pixel module, the file meta."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from dicom_node import codes as c
from dicom_node.derive.elements import DerivationError, format_ds
from dicom_node.derive.options import DerivationOptions
from dicom_node.derive.series import SourceSeries

#: Lowest CT number kept (HU): nothing in a patient is less dense than air (-1000 HU); scanners
#: store -1024 as their floor.  Interpolation undershoot below this (and below the source minimum)
#: is clipped; values above are never clipped.
CT_FLOOR_HU = -1024.0


#: MR magnitude signal is never negative: undershoot below 0 (or the source minimum) is clipped.
MR_FLOOR = 0.0


@dataclass(frozen=True)
class PixelEncoding:
    """How modality values are mapped to stored values, one choice for the whole series.

    Attributes
    ----------
    slopes, intercepts
        Per output slice, the Rescale Slope and Intercept written.
    pixel_representation, bits_stored
        Of the stored values.
    recomputed
        Whether one common slope/intercept was recomputed (the values did not fit otherwise).
    floor
        Values below it are clipped to it (the physical floor).
    padding_value
        The Pixel Padding Value written (stored units), or ``None``.
    """

    slopes: list[float]
    intercepts: list[float]
    pixel_representation: int
    bits_stored: int
    recomputed: bool
    floor: float
    padding_value: int | None = None
    collisions_possible: bool = True

    @property
    def dtype(self) -> type[np.unsignedinteger] | type[np.signedinteger]:
        """Stored value type (numpy)."""
        return np.uint16 if self.pixel_representation == 0 else np.int16


def _stored(values: np.ndarray, m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rounded stored values of modality ``values`` (float32, in place where possible)."""
    if np.all(m == 1):
        stored = np.rint(values)
        stored -= b
    else:
        stored = values - b
        stored /= m
    np.rint(stored, out=stored)
    return stored


def choose_encoding(
    source: SourceSeries, nearest: Sequence[int], bounds: np.ndarray
) -> PixelEncoding:
    """Choose the pixel encoding of a derived series before any slice is encoded.

    Modality values are clipped only from below, to the physically meaningful floor
    (:data:`CT_FLOOR_HU` for CT, :data:`MR_FLOOR` for MR, or the source minimum when that is
    lower): interpolation and networks undershoot at sharp edges.  Nothing is clipped from above.
    The source's Rescale Slope/Intercept (of the nearest source slice) is kept when the stored
    values fit 16 bits with the source's Pixel Representation or the other one; otherwise one
    common slope/intercept is recomputed (unsigned) so that the full range is represented.

    Parameters
    ----------
    source
        The source series.
    nearest
        Nearest source slice of every output slice.
    bounds
        ``(n, 2)``: lowest and highest modality value of every output slice, exact (the whole
        enhanced volume in memory) or an upper bound (the engine's plausible range, when the
        series is streamed: every instance then shares one encoding chosen before the first).
    """
    floor = CT_FLOOR_HU if source.modality == "CT" else MR_FLOOR
    floor = min(floor, float(source.value_min))
    slopes = [source.rescale_slopes[j] for j in nearest]
    intercepts = [source.rescale_intercepts[j] for j in nearest]
    if any(s == 0 for s in slopes):
        raise DerivationError("source Rescale Slope is 0")
    ends = np.maximum(np.asarray(bounds, dtype=np.float32), np.float32(floor))  # (n, 2)
    m = np.asarray(slopes, dtype=np.float32)[:, None]
    b = np.asarray(intercepts, dtype=np.float32)[:, None]
    stored = _stored(ends.copy(), m, b)  # monotonic in the value: the ends give the range
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
            return _with_padding(source, PixelEncoding(slopes, intercepts, pr, bits, False,
                                                       floor), lo, hi)
    vmin, vmax = float(ends.min()), float(ends.max())
    if not source.has_rescale and source.modality != "CT":
        raise DerivationError(
            f"enhanced values {vmin:.1f}..{vmax:.1f} do not fit 16 bits and the source"
            " has no Rescale Slope/Intercept to recompute"
        )
    slope = max(min(slopes), (vmax - vmin) / 65535.0)
    slope = float(format_number_as_ds(slope * (1 + 1e-6)))
    intercept = float(format_ds(math.floor(vmin)))
    n = len(nearest)
    return PixelEncoding([slope] * n, [intercept] * n, 0, 16, True, floor)


def _with_padding(source: SourceSeries, enc: PixelEncoding, lo_stored: float,
                  hi_stored: float) -> PixelEncoding:
    """Keep the source's Pixel Padding Value when the encoding can store it.

    ``lo_stored``, ``hi_stored``: the range of the stored values; a padding value outside it
    cannot collide with an enhanced value.
    """
    pad = source.padding_value
    if not source.has_padding or pad is None:
        return enc
    bits, pr = enc.bits_stored, enc.pixel_representation
    lo, hi = (0, 2**bits - 1) if pr == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if not lo <= pad <= hi:
        return enc
    return PixelEncoding(enc.slopes, enc.intercepts, pr, bits, enc.recomputed, enc.floor, pad,
                         lo_stored <= pad <= hi_stored)


def encode_slab(
    enc: PixelEncoding, values: np.ndarray, start: int, nearest: Sequence[int],
    padding: Callable[[int], np.ndarray | None],
) -> tuple[np.ndarray, int]:
    """Stored values of output slices ``start .. start+len(values)-1``.

    Parameters
    ----------
    enc
        The series' encoding (:func:`choose_encoding`).
    values
        float32 ``(k, rows, cols)`` modality values.
    start
        Index of the first output slice.
    nearest
        Nearest source slice of every output slice of the series.
    padding
        Source slice index -> its padding mask (``None``: no padding there).

    Returns
    -------
    tuple
        ``(stored values (k, rows, cols), voxels clipped to the floor)``.
    """
    # slice by slice through one float32 buffer (exact for integers up to 2**24): a slice stays
    # in cache and no whole-slab temporary is made
    vol = np.asarray(values, dtype=np.float32)
    k = vol.shape[0]
    stored = np.empty(vol.shape, dtype=enc.dtype)
    buf = np.empty(vol.shape[1:], dtype=np.float32)
    info = np.iinfo(enc.dtype)
    floor = np.float32(enc.floor)
    clipped = 0
    for i in range(k):
        v = vol[i]
        if float(v.min()) < enc.floor:
            clipped += int(np.count_nonzero(v < floor))
            np.maximum(v, floor, out=buf)
            v = buf
        if enc.recomputed:
            np.subtract(v, np.float32(enc.intercepts[0]), out=buf)
            buf /= np.float32(enc.slopes[0])
        else:
            m, b = enc.slopes[start + i], enc.intercepts[start + i]
            if m == 1:
                np.rint(v, out=buf)
                if b != 0:
                    buf -= np.float32(b)
            else:
                np.subtract(v, np.float32(b), out=buf)
                buf /= np.float32(m)
        np.rint(buf, out=buf)
        np.clip(buf, info.min, info.max, out=buf)  # within by construction; never wrap around
        stored[i] = buf
    if enc.padding_value is not None:
        _restore_padding(enc, stored, start, nearest, padding)
    return stored, clipped


def _output_padding_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Padding mask of one output slice: a source slice's mask, resampled by nearest pixel."""
    rows, cols = shape
    src_rows, src_cols = mask.shape
    if rows % src_rows == 0 and cols % src_cols == 0:  # integer factors: plain repetition
        return mask.repeat(rows // src_rows, axis=0).repeat(cols // src_cols, axis=1)
    ri = np.minimum(((np.arange(rows) + 0.5) * src_rows / rows).astype(int), src_rows - 1)
    ci = np.minimum(((np.arange(cols) + 0.5) * src_cols / cols).astype(int), src_cols - 1)
    return mask[ri][:, ci]


def _restore_padding(
    enc: PixelEncoding, stored: np.ndarray, start: int, nearest: Sequence[int],
    padding: Callable[[int], np.ndarray | None],
) -> None:
    """Write the source's Pixel Padding Value back into the padding region (in place).

    The padding region is the nearest source pixel's.  Non-padding voxels that happen to equal
    the padding value are moved one step away from it, so that padding means padding only.
    (When the padding value cannot be stored with the output's representation and bits,
    :func:`choose_encoding` leaves it out and the region keeps the fill value it was enhanced
    with.)
    """
    pad = enc.padding_value
    assert pad is not None
    bits = enc.bits_stored
    hi = 2**bits - 1 if enc.pixel_representation == 0 else 2 ** (bits - 1) - 1
    moved = pad + 1 if pad < hi else pad - 1
    for k in range(stored.shape[0]):
        out = stored[k]
        source_mask = padding(nearest[start + k])
        if enc.collisions_possible:
            collide = out == pad
            if source_mask is not None:
                collide &= ~_output_padding_mask(source_mask, out.shape)
            np.putmask(out, collide, moved)
        if source_mask is None or not source_mask.any():
            continue
        rows, cols = out.shape
        src_rows, src_cols = source_mask.shape
        if rows % src_rows == 0 and cols % src_cols == 0:  # integer factors: rows by view
            wide = source_mask.repeat(cols // src_cols, axis=1)
            blocks = out.reshape(src_rows, rows // src_rows, cols)
            np.copyto(blocks, enc.dtype(pad), where=wide[:, None, :])
        else:
            np.putmask(out, _output_padding_mask(source_mask, out.shape), pad)


def set_pixel_module(
    ds: Dataset, source: SourceSeries, enc: PixelEncoding, k: int, j: int, stored: np.ndarray
) -> None:
    """Image Pixel module, rescale and windowing of output slice ``k`` (nearest source ``j``).

    ``stored``: the slice's stored values.
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = source.photometric_interpretation
    ds.Rows, ds.Columns = stored.shape
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
    pixels = np.ascontiguousarray(stored).astype("<" + stored.dtype.str[1:], copy=False)
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
