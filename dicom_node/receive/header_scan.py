"""A fast, conservative scan of a received Part 10 file: the common case without pydicom.

Receiving is CPU-bound on small machines, and building a pydicom dataset (then converting the
header values) is most of that CPU.  :func:`scan_instance` walks the encoded bytes once with
``struct``: it checks the same structure :func:`dicom_node.receive.validation.parse_dataset` checks
(every length within the data, undefined lengths properly delimited, nothing after the last
element, the VRs of the image and identity attributes), extracts the header and applies the
image checks of :func:`dicom_node.receive.validation.check_image`.

It only ever vouches for clean, common data: explicit or implicit VR little endian, plain
ASCII text, one SOP Class/Instance, valid UIDs.  For anything else (another encoding,
non-ASCII text, an odd value, any structural problem) it returns ``None`` and the caller takes
the full pydicom path, which decides and explains.  So it can make receiving faster but never
changes what is accepted or refused.
"""

from __future__ import annotations

import re
import struct

from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.codes import ENCAPSULATED_TRANSFER_SYNTAXES
from dicom_node.receive.header import make_header
from dicom_node.receive.validation import MAX_MATRIX, MAX_PIXELS
from storage.errors import InvalidUIDError
from storage.filestore import validate_uid
from storage.records import InstanceHeader

_EXPLICIT_LE = str(ExplicitVRLittleEndian)
_IMPLICIT_LE = str(ImplicitVRLittleEndian)
#: Transfer syntaxes whose data set is explicit VR little endian with encapsulated pixel data.
_ENCAPSULATED = frozenset(str(ts) for ts in ENCAPSULATED_TRANSFER_SYNTAXES)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ASCII_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_MAX_DEPTH = 16
_DICTIONARY = DicomDictionary

#: Header attributes read by tag: keyword, and the VR (from the data dictionary) it must have
#: in explicit VR.
_WANTED: dict[int, tuple[str, bytes]] = {
    int(tag_for_keyword(keyword)): (keyword, dictionary_VR(keyword).encode())  # type: ignore[arg-type]
    for keyword in (
        "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "StudyDate",
        "AccessionNumber", "Modality", "StudyDescription", "SeriesDescription", "PatientName",
        "PatientID", "PatientBirthDate", "BodyPartExamined", "StudyInstanceUID",
        "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "SamplesPerPixel",
        "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation",
    )
}


class _UnsureError(Exception):
    """The scan cannot vouch for the data: the full path decides."""


def _walk(data: bytes, pos: int, end: int, explicit: bool, depth: int,
          found: dict[str, bytes] | None, until_delimiter: bool = False) -> tuple[int, int, bool]:
    """Walk the elements of a data set (``depth`` 0) or of one sequence item.

    Stops at ``end``, or after the item delimiter when ``until_delimiter`` (an item of undefined
    length).  Returns the position after the last element, the top-level pixel data length
    (-1 when absent) and whether it had undefined length; ``found`` collects the wanted
    top-level values.
    """
    if depth > _MAX_DEPTH:
        raise _UnsureError
    unpack = struct.unpack_from
    pixel_length, pixel_undefined = -1, False
    while pos < end:
        if pos + 8 > end:
            raise _UnsureError
        group, elem = unpack("<HH", data, pos)
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            if not until_delimiter or unpack("<I", data, pos + 4)[0] != 0:
                raise _UnsureError
            return pos + 8, pixel_length, pixel_undefined
        if group == 0xFFFE or (depth == 0 and group == 0x0002):
            raise _UnsureError
        if explicit:
            vr = data[pos + 4:pos + 6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _UnsureError
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _UnsureError
                length = unpack("<I", data, pos + 8)[0]
                pos += 12
            else:
                length = unpack("<H", data, pos + 6)[0]
                pos += 8
            is_sequence = vr == b"SQ"
        else:
            length = unpack("<I", data, pos + 4)[0]
            pos += 8
            vr = b""
            is_sequence = _DICTIONARY.get(tag, ("",))[0] == "SQ"
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and depth == 0:
                start = pos
                pos = _skip_fragments(data, pos, end)
                pixel_length, pixel_undefined = pos - start, True
                continue
            if not is_sequence:
                raise _UnsureError
            pos = _skip_items(data, pos, None, end, explicit, depth + 1)
            continue
        if pos + length > end:
            raise _UnsureError
        if is_sequence:
            _skip_items(data, pos, pos + length, end, explicit, depth + 1)
        elif depth == 0:
            if tag == _PIXEL_DATA:
                if explicit and vr not in (b"OB", b"OW"):
                    raise _UnsureError
                pixel_length = length
            elif found is not None and tag in _WANTED:
                keyword, expected_vr = _WANTED[tag]
                if explicit and vr != expected_vr:
                    raise _UnsureError
                found[keyword] = data[pos:pos + length]
        pos += length
    if until_delimiter:
        raise _UnsureError  # an undefined-length item ran to the end without its delimiter
    return pos, pixel_length, pixel_undefined


def _skip_items(data: bytes, pos: int, stop: int | None, end: int, explicit: bool,
                depth: int) -> int:
    """Walk the items of a sequence: up to ``stop``, or to its delimiter when ``stop`` is None."""
    unpack = struct.unpack_from
    limit = end if stop is None else stop
    while stop is None or pos < stop:
        if pos + 8 > limit:
            raise _UnsureError
        group, elem, length = unpack("<HHI", data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END and stop is None:
            if length != 0:
                raise _UnsureError
            return pos
        if tag != _ITEM:
            raise _UnsureError
        if length == _UNDEFINED:
            pos, _, _ = _walk(data, pos, limit, explicit, depth, None, until_delimiter=True)
        else:
            if pos + length > limit:
                raise _UnsureError
            _walk(data, pos, pos + length, explicit, depth, None)
            pos += length
    return pos


def _skip_fragments(data: bytes, pos: int, end: int) -> int:
    """Skip encapsulated pixel data items up to its sequence delimiter."""
    unpack = struct.unpack_from
    while True:
        if pos + 8 > end:
            raise _UnsureError
        group, elem, length = unpack("<HHI", data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            if length != 0:
                raise _UnsureError
            return pos
        if tag != _ITEM or length == _UNDEFINED or pos + length > end:
            raise _UnsureError
        pos += length


def _meta(data: bytes) -> tuple[dict[int, bytes], int]:
    """Parse the File Meta Information; return its elements and where the data set starts."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise _UnsureError
    group, elem, vr, length = struct.unpack_from("<HH2sH", data, 132)
    if (group, elem, vr, length) != (2, 0, b"UL", 4):
        raise _UnsureError
    end = 144 + struct.unpack_from("<I", data, 140)[0]
    if end > len(data):
        raise _UnsureError
    pos, elements = 144, {}
    while pos < end:
        if pos + 8 > end:
            raise _UnsureError
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if group != 2:
            raise _UnsureError
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8
        if pos + length > end:
            raise _UnsureError
        elements[elem] = data[pos:pos + length]
        pos += length
    return elements, end


def _ascii(raw: bytes) -> str:
    if any(b < 0x20 or b > 0x7E for b in raw.rstrip(b"\x00")):
        raise _UnsureError  # non-ASCII or control characters (ISO 2022): the full path decodes
    return raw.decode("ascii").replace("\x00", "").strip()


def _single_text(found: dict[str, bytes], keyword: str) -> str:
    text = _ascii(found.get(keyword, b""))
    if "\\" in text:
        raise _UnsureError
    return text


def _uid(found: dict[str, bytes], keyword: str) -> str:
    raw = found.get(keyword)
    if raw is None:
        raise _UnsureError
    value = raw.decode("ascii", "replace").strip("\x00 ")
    if not value:
        raise _UnsureError
    try:
        return validate_uid(value)
    except InvalidUIDError as exc:
        raise _UnsureError from exc


def _is(found: dict[str, bytes], keyword: str) -> int | None:
    text = _ascii(found.get(keyword, b""))
    if not text:
        return None
    if not _INT_RE.match(text):
        raise _UnsureError
    return int(text)


def _us(found: dict[str, bytes], keyword: str, default: int | None = None) -> int:
    raw = found.get(keyword)
    if raw is None:
        if default is None:
            raise _UnsureError
        return default
    if len(raw) != 2:
        raise _UnsureError
    return int(struct.unpack("<H", raw)[0])


def scan_instance(data: bytes) -> InstanceHeader | None:
    """Return the header of a clean, common received instance, else ``None``.

    Parameters
    ----------
    data
        The received Part 10 file.

    Returns
    -------
    InstanceHeader or None
        The header (the instance passed every check :func:`parse_dataset` and
        :func:`check_image` make), or ``None``: take the full path.
    """
    try:
        return _scan(data)
    except _UnsureError:
        return None
    except Exception:  # noqa: BLE001 - the scan never decides a failure; the full path does
        return None


def _scan(data: bytes) -> InstanceHeader:
    meta, start = _meta(data)
    ts = meta.get(0x0010, b"").decode("ascii", "replace").strip("\x00 ")
    if ts == _EXPLICIT_LE or ts in _ENCAPSULATED:
        explicit = True
    elif ts == _IMPLICIT_LE:
        explicit = False
    else:
        raise _UnsureError
    found: dict[str, bytes] = {}
    end, pixel_length, pixel_undefined = _walk(data, start, len(data), explicit, 0, found)
    if end != len(data):
        raise _UnsureError
    charset = _ascii(found.get("SpecificCharacterSet", b""))
    if charset not in _ASCII_CHARSETS:
        raise _UnsureError
    # the image checks of check_image
    rows, cols = _us(found, "Rows"), _us(found, "Columns")
    bits, spp = _us(found, "BitsAllocated"), _us(found, "SamplesPerPixel", 1)
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        if keyword in found:
            _us(found, keyword)
    frames = _is(found, "NumberOfFrames") if "NumberOfFrames" in found else 1
    if frames is None or frames <= 0 or rows <= 0 or cols <= 0 or spp <= 0:
        raise _UnsureError
    if rows > MAX_MATRIX or cols > MAX_MATRIX or rows * cols * frames > MAX_PIXELS:
        raise _UnsureError
    if bits not in (1, 8, 16, 32) or pixel_length < 0:
        raise _UnsureError
    if ts in _ENCAPSULATED:
        if not pixel_undefined or pixel_length < 16:
            raise _UnsureError
    elif pixel_undefined or pixel_length < rows * cols * spp * frames * bits // 8:
        raise _UnsureError
    raw_type = _ascii(found.get("ImageType", b""))
    image_type = tuple(t.strip() for t in raw_type.split("\\")) if raw_type else ()
    return make_header(
        patient_id=_single_text(found, "PatientID"),
        patient_name=_single_text(found, "PatientName"),
        patient_birth_date=_single_text(found, "PatientBirthDate"),
        study_instance_uid=_uid(found, "StudyInstanceUID"),
        study_date=_single_text(found, "StudyDate"),
        accession_number=_single_text(found, "AccessionNumber"),
        study_description=_single_text(found, "StudyDescription"),
        series_instance_uid=_uid(found, "SeriesInstanceUID"),
        sop_instance_uid=_uid(found, "SOPInstanceUID"),
        sop_class_uid=_uid(found, "SOPClassUID"),
        transfer_syntax_uid=validate_uid(ts),
        modality=_single_text(found, "Modality"),
        body_part_examined=_single_text(found, "BodyPartExamined"),
        series_description=_single_text(found, "SeriesDescription"),
        series_number=_is(found, "SeriesNumber"),
        instance_number=_is(found, "InstanceNumber"),
        image_type=image_type,
    )
