"""Cheap sanity checks of a received image before it is acknowledged.

The pixel data is not decoded: only its declared size is compared with the image attributes, so
that truncated or inconsistent images are refused at the door instead of failing (or exhausting
memory) later in processing.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset

#: Largest matrix edge accepted (the largest CT/MR matrices in use are 2048).
MAX_MATRIX = 8192
#: Most pixels per instance (all frames) accepted: 2**31 pixels.
MAX_PIXELS = 2**31


class InvalidImageError(ValueError):
    """The image attributes and pixel data of a received instance are inconsistent."""


def parse_dataset(data: bytes) -> Dataset:
    """Parse an encoded Part 10 file (pixel data kept as raw bytes, never decoded)."""
    return pydicom.dcmread(io.BytesIO(data), force=True)


def check_image(ds: Dataset) -> None:
    """Check the Image Pixel attributes against the pixel data's encoded size.

    Raises
    ------
    InvalidImageError
        Missing or zero dimensions, an absurd matrix, a colour or unsupported layout, missing
        pixel data, native pixel data shorter than Rows x Columns x Samples x Frames, or
        encapsulated pixel data without fragments.
    """
    if "PixelData" not in ds:
        raise InvalidImageError("no Pixel Data (7FE0,0010)")
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidImageError(f"missing or invalid image attributes: {exc}") from exc
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise InvalidImageError(f"invalid dimensions {rows}x{cols}x{frames}")
    if rows > MAX_MATRIX or cols > MAX_MATRIX or rows * cols * frames > MAX_PIXELS:
        raise InvalidImageError(f"implausible dimensions {rows}x{cols}x{frames}")
    if bits not in (1, 8, 16, 32):
        raise InvalidImageError(f"unsupported BitsAllocated {bits}")
    value = ds["PixelData"].value
    if value is None:
        raise InvalidImageError("empty Pixel Data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts.is_compressed:
        if not ds["PixelData"].is_undefined_length or len(value) < 16:
            raise InvalidImageError("compressed Pixel Data is not encapsulated")
        return
    expected = rows * cols * spp * frames * bits // 8
    if len(value) < expected:
        raise InvalidImageError(
            f"Pixel Data has {len(value)} bytes, {rows}x{cols}x{spp}x{frames} at {bits} bits "
            f"needs {expected}"
        )
