"""Cheap sanity checks of a received image before it is acknowledged.

The pixel data is not decoded: only its declared size is compared with the image attributes, so
that truncated or inconsistent images are refused at the door instead of failing (or exhausting
memory) later in processing.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from storage.errors import InvalidInstanceError

#: Largest matrix edge accepted (the largest CT/MR matrices in use are 2048).
MAX_MATRIX = 8192
#: Most pixels per instance (all frames) accepted: 2**31 pixels.
MAX_PIXELS = 2**31


#: Value Representations the image and identity attributes must have (explicit VR).
_REQUIRED_VRS: dict[str, tuple[str, ...]] = {
    "Rows": ("US",), "Columns": ("US",), "BitsAllocated": ("US",), "BitsStored": ("US",),
    "HighBit": ("US",), "PixelRepresentation": ("US",), "SamplesPerPixel": ("US",),
    "NumberOfFrames": ("IS",), "StudyInstanceUID": ("UI",), "SeriesInstanceUID": ("UI",),
    "SOPInstanceUID": ("UI",), "SOPClassUID": ("UI",), "PixelData": ("OB", "OW"),
}
_REQUIRED_VR_TAGS: dict[int, tuple[str, tuple[str, ...]]] = {
    int(tag_for_keyword(keyword)): (keyword, vrs)  # type: ignore[arg-type]
    for keyword, vrs in _REQUIRED_VRS.items()
}
_DELIMITERS = (b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\xdd")  # (FFFE,E0DD) LE and BE


class InvalidImageError(ValueError):
    """The image attributes and pixel data of a received instance are inconsistent."""


class MalformedDataSetError(InvalidInstanceError):
    """The encoded data set is structurally broken.

    Truncated, a length beyond the end, trailing bytes, the wrong encoding or wrong VRs.
    """


def parse_dataset(data: bytes) -> Dataset:
    """Parse an encoded Part 10 file (pixel data kept as raw bytes, never decoded).

    pydicom reads leniently (a value cut short by the end of the data is silently kept short),
    so the top-level elements are checked here: every declared length must lie within the
    data, every undefined length must end with its delimiter, the encoding must be the one the
    transfer syntax names and the image and identity attributes must have their VRs.

    Raises
    ------
    MalformedDataSetError
        The data set is truncated or inconsistently encoded.
    """
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    known = ts is not None and ts.is_transfer_syntax
    deflated = known and ts.is_deflated
    # positions refer to the inflated stream for deflated transfer syntaxes
    positional = not deflated
    check_encoding = known and not deflated
    implicit = bool(known and ts.is_implicit_VR)
    little = bool(known and ts.is_little_endian)
    end = -1
    for elem in ds.elements():
        if not isinstance(elem, RawDataElement):
            end = -1
            continue
        if check_encoding and (
            elem.is_implicit_VR != implicit or elem.is_little_endian != little
        ):
            raise MalformedDataSetError(
                f"data set is not encoded as its transfer syntax {ts.name} says"
            )
        value = elem.value or b""
        end = elem.value_tell + len(value)
        if elem.length == 0xFFFFFFFF:
            if positional and data[end:end + 4] not in _DELIMITERS:
                raise MalformedDataSetError(
                    f"element {Tag(elem.tag)} of undefined length has no delimiter (truncated)"
                )
            end += 8
        elif len(value) != elem.length:
            raise MalformedDataSetError(
                f"element {Tag(elem.tag)} declares {elem.length} bytes, only {len(value)} "
                "present (truncated or length beyond the end)"
            )
    if positional and 0 <= end != len(data):
        raise MalformedDataSetError(
            f"{len(data) - end} bytes after the last element (truncated element header or "
            "trailing garbage)"
        )
    for tag, (keyword, vrs) in _REQUIRED_VR_TAGS.items():
        elem = ds.get_item(tag)
        if elem is not None:
            vr = getattr(elem, "VR", None)
            if vr is not None and vr not in vrs:
                raise MalformedDataSetError(f"{keyword} has VR {vr}, expected {'/'.join(vrs)}")
    return ds


def _number_of_frames(ds: Dataset) -> int:
    """Number of Frames (1 when absent); a present value must be a positive integer."""
    if "NumberOfFrames" not in ds or ds.NumberOfFrames in (None, ""):
        return 1
    value = ds.NumberOfFrames
    if float(value) != int(float(value)):
        raise ValueError(f"Number of Frames {value} is not an integer")
    return int(float(value))


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
        frames = _number_of_frames(ds)
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
