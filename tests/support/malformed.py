"""A corpus of malformed (and a few odd but valid) CT/MR instances for the receive-path tests.

Every case is a complete Part 10 file as bytes.  The C-STORE sender uses the file meta for the
presentation context and the Affected SOP Class/Instance UID and sends the data set after it
byte for byte (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``), so broken data sets reach the SCP
exactly as built here.  Cases are generated, not shipped: a valid base image from pydicom's test
files is re-encoded and then damaged (truncated, wrong VRs, lengths beyond the end, absurd
dimensions, bad UIDs, odd character sets, ...).

Each case says what the SCP must answer: ``"refuse"`` (a failure status), ``"accept"`` (success:
the data set is valid; this includes valid but unusual data sets such as ISO 2022 or broken
character sets, which the README promises are stored) or ``"either"`` (stored
intact or refused cleanly).  ``"negotiation"`` cases propose a transfer syntax srnode does not
accept: their presentation context must be rejected.
"""

from __future__ import annotations

import copy
import io
import secrets
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = [
    "Expectation",
    "MalformedCase",
    "base_dataset",
    "encode",
    "malformed_corpus",
    "part10",
    "split_meta",
]

#: What the SCP must answer for a case.
Expectation = str

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}


@dataclass(frozen=True)
class MalformedCase:
    """One crafted instance.

    Attributes
    ----------
    name
        Short unique name (used in test ids and messages).
    data
        The complete Part 10 file (preamble, file meta, data set).
    expect
        ``"refuse"``, ``"accept"``, ``"either"`` or ``"negotiation"``.
    """

    name: str
    data: bytes
    expect: Expectation

    @property
    def meta(self) -> FileMetaDataset:
        """The file meta of :attr:`data`."""
        return split_meta(self.data)[0]

    def write(self, folder: Path) -> Path:
        """Write :attr:`data` to ``folder/<name>.dcm`` and return the path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.dcm"
        path.write_bytes(self.data)
        return path


def split_meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """Return the file meta of a Part 10 file and the offset where its data set starts."""
    from pydicom.filereader import read_dataset, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, _vr, _length: tag.group != 2)
    return FileMetaDataset(meta), fp.tell()


def base_dataset(name: str = "CT_small.dcm") -> Dataset:
    """A valid CT (or MR) image from pydicom's test files with fresh UIDs.

    MR images get ImageType ORIGINAL\\PRIMARY\\OTHER so that they would be processed.
    """
    from tests.support.node import sample_file

    ds = pydicom.dcmread(sample_file(name))
    ds.StudyInstanceUID = fixed_length_uid()
    ds.SeriesInstanceUID = fixed_length_uid()
    ds.SOPInstanceUID = fixed_length_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if ds.Modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    return ds


def part10(body: bytes, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Wrap an encoded data set in a preamble and file meta naming these UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    fp = io.BytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(fp, meta, enforce_standard=True)
    fp.write(body)
    return fp.getvalue()


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode ``ds`` without preamble and meta in ``transfer_syntax`` (values written as is).

    Compressed transfer syntaxes are written as explicit VR little endian (the pixel data must
    already be encapsulated).
    """
    ts = pydicom.uid.UID(transfer_syntax)
    out = copy.copy(ds)
    out.file_meta = FileMetaDataset()
    out.preamble = None
    fp = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.filewriter.dcmwrite(fp, out, implicit_vr=ts.is_implicit_VR,
                                    little_endian=ts.is_little_endian,
                                    enforce_file_format=False, force_encoding=True)
    return fp.getvalue()


def _part10_of(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian,
               sop_class: str | None = None, sop_instance: str | None = None) -> bytes:
    body = encode(ds, transfer_syntax)
    return part10(body, sop_class or str(ds.SOPClassUID), sop_instance or str(ds.SOPInstanceUID),
                  transfer_syntax)


def _elements(body: bytes) -> list[tuple[int, int, int, bytes]]:
    """Top-level elements of an explicit VR little endian body: (tag, start, end, VR)."""
    out = []
    pos = 0
    while pos + 8 <= len(body):
        group, elem = struct.unpack_from("<HH", body, pos)
        vr = body[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", body, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", body, pos + 6)[0]
            header = 8
        if length == 0xFFFFFFFF:
            raise ValueError("undefined length in the base body is not supported here")
        end = pos + header + length
        out.append(((group << 16) | elem, pos, end, vr))
        pos = end
    return out


def _element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element (``length`` overrides the declared length)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr.encode("ascii") in _LONG_VRS:
        head += b"\x00\x00" + struct.pack("<I", n)
    else:
        head += struct.pack("<H", n & 0xFFFF)
    return head + value


def _replace(body: bytes, keyword: str, new: bytes | None) -> bytes:
    """Replace (or drop, ``new=None``) a top-level element of an explicit VR LE body."""
    tag = int(Tag(keyword))
    for t, start, end, _vr in _elements(body):
        if t == tag:
            return body[:start] + (new or b"") + body[end:]
    raise KeyError(keyword)


def _set_raw(body: bytes, keyword: str, raw: bytes) -> bytes:
    """Replace a top-level element by ``raw``, or insert it in tag order when absent."""
    tag = int(Tag(keyword))
    for t, start, end, _vr in _elements(body):
        if t == tag:
            return body[:start] + raw + body[end:]
        if t > tag:
            return body[:start] + raw + body[start:]
    return body + raw


def _with(ds: Dataset, **changes: object) -> Dataset:
    out = copy.deepcopy(ds)
    for k, v in changes.items():
        if v is None:
            if k in out:
                delattr(out, k)
        else:
            setattr(out, k, v)
    return out


def fixed_length_uid() -> str:
    """A new unique UID, always 48 characters long (so encoded offsets do not move)."""
    return "1.2.826.0.1.3680043.10.543.1." + f"{secrets.randbelow(9 * 10**18) + 10**18:019d}"


def _fresh(ds: Dataset) -> Dataset:
    """A copy with a new SOP Instance UID of fixed length (meta and data set agree)."""
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = fixed_length_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _truncations(ct: Dataset) -> Iterator[MalformedCase]:
    body = encode(ct)
    elements = _elements(body)
    pixel = next(e for e in elements if e[0] == 0x7FE00010)
    # element boundaries at or after the end of the pixel data: a cut there is a valid data set
    valid_cuts = {end for _t, _s, end, _v in elements if end >= pixel[2]}
    n = len(body)
    offsets = sorted({0, 1, 3, 7, 8, 11, 12, 50, 99, 200, 333, 512, 1000, 1500, 2000, 3000,
                      4000, 5000, pixel[1] - 1, pixel[1], pixel[1] + 4, pixel[1] + 11,
                      pixel[1] + 12, pixel[1] + 13, pixel[1] + 1000, n // 2, pixel[2] - 2,
                      pixel[2] - 1, pixel[2] + 1, pixel[2] + 7, pixel[2] + 12, n - 1, n - 2,
                      n - 64})
    for cut in offsets:
        if not 0 <= cut < n:
            continue
        expect = "accept" if cut in valid_cuts else "refuse"
        if cut in valid_cuts:
            continue  # the data set is complete there; other tests cover valid instances
        d = _fresh(ct)
        b = encode(d)[:cut]
        yield MalformedCase(f"truncated-{cut}", part10(b, str(d.SOPClassUID),
                                                       str(d.SOPInstanceUID),
                                                       ExplicitVRLittleEndian), expect)
    # other encodings cut in the middle of the pixel data
    for ts, label in ((ImplicitVRLittleEndian, "implicit"), (ExplicitVRBigEndian, "bigendian")):
        d = _fresh(ct)
        b = encode(d, ts)
        for frac in (0.3, 0.9):
            cut = int(len(b) * frac)
            yield MalformedCase(f"truncated-{label}-{cut}",
                                part10(b[:cut], str(d.SOPClassUID), str(d.SOPInstanceUID), ts),
                                "refuse")
    d = _fresh(ct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.compress(RLELossless, generate_instance_uid=False)
    b = encode(d, RLELossless)
    for cut in (len(b) - 4, len(b) - 9, len(b) // 2, len(b) - len(d.PixelData) + 8):
        yield MalformedCase(f"truncated-rle-{cut}",
                            part10(b[:cut], str(d.SOPClassUID), str(d.SOPInstanceUID),
                                   RLELossless), "refuse")


def _wrong_vrs(ct: Dataset) -> Iterator[MalformedCase]:
    specs: list[tuple[str, str, str, bytes]] = [
        ("rows-as-ds", "Rows", "DS", b"128 "),
        ("rows-as-us-3-bytes", "Rows", "US", b"\x80\x00\x00\x00"[:3] + b""),
        ("rows-as-ob", "Rows", "OB", b"\x80\x00"),
        ("columns-as-cs", "Columns", "CS", b"ABCD"),
        ("bits-allocated-as-ui", "BitsAllocated", "UI", b"1.2\x00"),
        ("study-uid-as-us", "StudyInstanceUID", "US", b"\x01\x00"),
        ("sop-uid-as-sq", "SOPInstanceUID", "SQ", b"\x01\x02\x03\x04"),
        ("series-uid-as-ob", "SeriesInstanceUID", "OB", b"1.2.3\x00"),
        ("unknown-vr-zz", "Rows", "ZZ", b"\x80\x00"),
        ("pixel-data-as-ui", "PixelData", "UI", b"1.2.3.4\x00"),
        ("bits-stored-as-fl", "BitsStored", "FL", struct.pack("<f", 16.0)),
    ]
    for name, keyword, vr, value in specs:
        d = _fresh(ct)
        body = encode(d)
        if vr == "ZZ":
            raw = struct.pack("<HH", 0x0028, 0x0010) + b"ZZ" + struct.pack("<H", len(value)) + value
        else:
            raw = _element(int(Tag(keyword)), vr, value)
        body = _replace(body, keyword, raw)
        sop_uid = str(d.SOPInstanceUID)
        yield MalformedCase(f"wrong-vr-{name}",
                            part10(body, str(d.SOPClassUID), sop_uid, ExplicitVRLittleEndian),
                            "refuse")


def _lengths_beyond_end(ct: Dataset) -> Iterator[MalformedCase]:
    cases: list[tuple[str, str, str, int]] = [
        ("pixel-data-double", "PixelData", "OW", -2),
        ("pixel-data-huge", "PixelData", "OW", 0x7FFFFFF0),
        ("pixel-data-max", "PixelData", "OW", 0xFFFFFFFE),
        ("description-huge", "StudyDescription", "UT", 0x7FFFFFF0),
        ("short-vr-65534", "StudyDate", "DA", 0xFFFE),
    ]
    for name, keyword, vr, length in cases:
        d = _fresh(ct)
        if keyword == "StudyDescription":
            d.StudyDescription = "x"
        body = encode(d)
        tag = int(Tag(keyword))
        t, start, end, old_vr = next(e for e in _elements(body) if e[0] == tag)
        header = 12 if old_vr in _LONG_VRS else 8
        value = body[start + header:end]
        declared = 2 * len(value) if length == -2 else length
        raw = _element(tag, vr, value, declared)
        if keyword == "PixelData":
            body = body[:start] + raw  # the last element: its length runs past the end
        else:
            body = body[:start] + raw + body[end:]
        yield MalformedCase(f"length-beyond-end-{name}",
                            part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                                   ExplicitVRLittleEndian), "refuse")


def _pixel_cases(ct: Dataset) -> Iterator[MalformedCase]:
    half = bytes(ct.PixelData[: len(ct.PixelData) // 2])
    variants: list[tuple[str, dict[str, object]]] = [
        ("no-pixel-data", {"PixelData": None}),
        ("empty-pixel-data", {"PixelData": b""}),
        ("pixel-data-half", {"PixelData": half}),
        ("pixel-data-one-row-short", {"PixelData": bytes(ct.PixelData[: -2 * int(ct.Columns)])}),
        ("frames-2-data-1", {"NumberOfFrames": 2}),
        ("samples-3", {"SamplesPerPixel": 3, "PlanarConfiguration": 0}),
        ("bits-32-data-16", {"BitsAllocated": 32, "BitsStored": 32, "HighBit": 31}),
        ("no-rows", {"Rows": None}),
        ("no-bits-allocated", {"BitsAllocated": None}),
        ("rows-0", {"Rows": 0}),
        ("columns-0", {"Columns": 0}),
        ("bomb-65535", {"Rows": 65535, "Columns": 65535}),
        ("bomb-rows-8193", {"Rows": 8193}),
        ("bomb-frames-huge", {"NumberOfFrames": 2**31 - 1}),
        ("bomb-frames-2e9", {"NumberOfFrames": "2000000000"}),
        ("bomb-pixels-just-over", {"Rows": 8192, "Columns": 8192, "NumberOfFrames": 33}),
        ("frames-0", {"NumberOfFrames": 0}),
        ("frames-negative", {"NumberOfFrames": "-5"}),
        ("bits-allocated-0", {"BitsAllocated": 0}),
        ("bits-allocated-12", {"BitsAllocated": 12}),
        ("bits-allocated-64", {"BitsAllocated": 64}),
    ]
    for name, changes in variants:
        d = _with(_fresh(ct), **changes)
        yield MalformedCase(name, _part10_of(d), "refuse")
    for name, keyword, vr, value in (("frames-text", "NumberOfFrames", "IS", b"abc "),
                                     ("frames-float", "NumberOfFrames", "IS", b"1.5 "),
                                     ("rows-text-us-odd", "Rows", "US", b"\x80")):
        d = _fresh(ct)
        body = _set_raw(encode(d), keyword, _element(int(Tag(keyword)), vr, value))
        yield MalformedCase(name, part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                                         ExplicitVRLittleEndian), "refuse")
    # native pixel data under a compressed transfer syntax: not encapsulated
    d = _fresh(ct)
    body = encode(d, ExplicitVRLittleEndian)
    yield MalformedCase("native-pixels-as-jpeg",
                        part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                               JPEGBaseline8Bit), "refuse")


def _encoding_mismatch(ct: Dataset) -> Iterator[MalformedCase]:
    for name, body_ts, meta_ts in (
        ("implicit-body-explicit-meta", ImplicitVRLittleEndian, ExplicitVRLittleEndian),
        ("bigendian-body-explicit-meta", ExplicitVRBigEndian, ExplicitVRLittleEndian),
        ("explicit-body-bigendian-meta", ExplicitVRLittleEndian, ExplicitVRBigEndian),
    ):
        d = _fresh(ct)
        yield MalformedCase(name, part10(encode(d, body_ts), str(d.SOPClassUID),
                                         str(d.SOPInstanceUID), meta_ts), "refuse")


def _unknown_transfer_syntax(ct: Dataset) -> Iterator[MalformedCase]:
    for name, ts in (("private", "1.2.826.0.1.3680043.2.1143.999"),
                     ("retired-jpeg-p3-5", "1.2.840.10008.1.2.4.52"),
                     ("mpeg2", "1.2.840.10008.1.2.4.100")):
        d = _fresh(ct)
        yield MalformedCase(f"unknown-ts-{name}", part10(encode(d), str(d.SOPClassUID),
                                                          str(d.SOPInstanceUID), ts),
                            "negotiation")


def _mismatched_meta(ct: Dataset, mr: Dataset) -> Iterator[MalformedCase]:
    d = _fresh(ct)
    yield MalformedCase("meta-sop-instance-differs",
                        part10(encode(d), str(d.SOPClassUID), generate_uid(),
                               ExplicitVRLittleEndian), "refuse")
    d = _fresh(ct)
    yield MalformedCase("meta-sop-class-mr-data-ct",
                        part10(encode(d), MRImageStorage, str(d.SOPInstanceUID),
                               ExplicitVRLittleEndian), "refuse")
    d = _fresh(mr)
    yield MalformedCase("meta-sop-class-ct-data-mr",
                        part10(encode(d), CTImageStorage, str(d.SOPInstanceUID),
                               ExplicitVRLittleEndian), "refuse")
    d = _fresh(ct)
    yield MalformedCase("meta-both-differ",
                        part10(encode(d), MRImageStorage, generate_uid(),
                               ExplicitVRLittleEndian), "refuse")


_BAD_UIDS: dict[str, str] = {
    "dotdot": "../../../etc/passwd",
    "dotdot-prefix": "1.2.3/../../x",
    "slash": "1.2/3.4",
    "absolute": "/tmp/srnode-escape",
    "backslash": "..\\..\\windows",
    "nul": "1.2.3\x00/../x",
    "leading-zero": "1.02.3",
    "letters": "1.2.abc",
    "space": "1.2 3.4",
    "too-long": "1." + "2" * 70,
    "empty-component": "1..2",
    "trailing-dot": "1.2.",
}


def _bad_uids(ct: Dataset) -> Iterator[MalformedCase]:
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for label, bad in _BAD_UIDS.items():
            if keyword != "SOPInstanceUID" and label in ("trailing-dot", "empty-component"):
                continue
            d = _fresh(ct)
            body = encode(d)
            raw_value = bad.encode("latin-1")
            if len(raw_value) % 2:
                raw_value += b"\x00"
            body = _replace(body, keyword, _element(int(Tag(keyword)), "UI", raw_value))
            affected = str(d.SOPInstanceUID)
            if keyword == "SOPInstanceUID" and len(bad) <= 64 and not set(bad) & {"\x00", "\\"}:
                affected = bad  # the Affected SOP Instance UID carries the path trick too
            yield MalformedCase(f"uid-{keyword}-{label}",
                                part10(body, str(d.SOPClassUID), affected,
                                       ExplicitVRLittleEndian), "refuse")
    d = _fresh(ct)
    body = _replace(encode(d), "SeriesInstanceUID",
                    _element(int(Tag("SeriesInstanceUID")), "UI", b"1.2.3\\4.5.6\x00"))
    yield MalformedCase("uid-series-multivalued",
                        part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                               ExplicitVRLittleEndian), "refuse")
    d = _with(_fresh(ct), StudyInstanceUID=None)
    yield MalformedCase("uid-study-missing", _part10_of(d), "refuse")


def _charsets(ct: Dataset) -> Iterator[MalformedCase]:
    """Odd or invalid character sets: stored intact or refused cleanly, never a crash."""
    specs: list[tuple[str, str | list[str], bytes]] = [
        ("utf8", "ISO_IR 192", "Müller^Jürgen=ミュラー".encode()),
        ("latin1", "ISO_IR 100", "Müller^Jürgen".encode("latin-1")),
        ("iso2022-japanese", ["", "ISO 2022 IR 87"],
         b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        ("iso2022-korean", ["", "ISO 2022 IR 149"],
         b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7"),
        ("gb18030", "GB18030", "Wang^XiaoDong=王^小东".encode("gb18030")),
        ("unknown-charset", "ISO_IR 999", b"Smith^John"),
        ("ascii-declared-high-bytes", "ISO_IR 6", b"Sm\xffth^J\xf6hn"),
        ("utf8-invalid-bytes", "ISO_IR 192", b"Bad\xc3\x28^Utf\xe2\x82"),
        ("iso2022-unterminated-escape", ["", "ISO 2022 IR 87"], b"Yamada^\x1b$B;3"),
        ("nul-inside-name", "ISO_IR 100", b"Smi\x00th^John"),
        ("control-characters", "ISO_IR 100", b"Smith\x07\x1b[2J^John\r\n"),
    ]
    for name, charset, name_bytes in specs:
        d = _fresh(ct)
        d.SpecificCharacterSet = charset
        if "PatientName" in d:
            del d.PatientName
        body = encode(d)
        value = name_bytes + (b" " if len(name_bytes) % 2 else b"")
        pn = _element(int(Tag("PatientName")), "PN", value)
        elements = _elements(body)
        # insert PatientName in tag order
        at = next(start for t, start, _e, _v in elements if t > 0x00100010)
        body = body[:at] + pn + body[at:]
        yield MalformedCase(f"charset-{name}",
                            part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                                   ExplicitVRLittleEndian), "accept")


def _garbage(ct: Dataset) -> Iterator[MalformedCase]:
    sop = generate_uid()
    bodies: dict[str, bytes] = {
        "zeros": b"\x00" * 4096,
        "ff": b"\xff" * 4096,
        "counting": bytes(range(256)) * 16,
        "text": b"<?xml version='1.0'?><dicom>not really</dicom>\n" * 20,
        "nested-part10": _part10_of(_fresh(ct)),
        "one-byte": b"\x08",
    }
    for name, body in bodies.items():
        yield MalformedCase(f"garbage-{name}",
                            part10(body, CTImageStorage, sop if name != "nested-part10"
                                   else generate_uid(), ExplicitVRLittleEndian), "refuse")
    # a sequence of undefined length that never ends (swallows the rest of the data set)
    d = _fresh(ct)
    body = encode(d)
    at = next(start for t, start, _e, _v in _elements(body) if t > 0x00081140)
    sq = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    body = body[:at] + sq + item + body[at:]
    yield MalformedCase("sequence-without-delimiter",
                        part10(body, str(d.SOPClassUID), str(d.SOPInstanceUID),
                               ExplicitVRLittleEndian), "refuse")


def malformed_corpus() -> list[MalformedCase]:
    """Generate the whole corpus (well over 100 cases, unique names, fresh UIDs)."""
    ct = base_dataset("CT_small.dcm")
    mr = base_dataset("MR_small.dcm")
    generators: list[Callable[[], Iterator[MalformedCase]]] = [
        lambda: _truncations(ct),
        lambda: _wrong_vrs(ct),
        lambda: _lengths_beyond_end(ct),
        lambda: _pixel_cases(ct),
        lambda: _encoding_mismatch(ct),
        lambda: _unknown_transfer_syntax(ct),
        lambda: _mismatched_meta(ct, mr),
        lambda: _bad_uids(ct),
        lambda: _charsets(ct),
        lambda: _garbage(ct),
    ]
    cases = [case for gen in generators for case in gen()]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicate case names in the malformed corpus")
    return cases


# --------------------------------------------------------------------------- fuzzing support
#: SOP Instance UID written into fuzz seeds and replaced by a fresh UID of the same length in
#: every input, so the Affected SOP Instance UID matches unless a mutation hit it.
SEED_SOP_INSTANCE_UID = "1.2.826.0.1.3680043.10.543." + "9" * 20


@dataclass(frozen=True)
class Seed:
    """A valid encoded data set to mutate, with the context it is sent under.

    Attributes
    ----------
    name
        Short name.
    body
        The data set without preamble and meta, SOP Instance UID :data:`SEED_SOP_INSTANCE_UID`.
    sop_class_uid, transfer_syntax_uid
        The presentation context.
    """

    name: str
    body: bytes
    sop_class_uid: str
    transfer_syntax_uid: str


def receive_seeds() -> list[Seed]:
    """Valid CT/MR data sets in several encodings (explicit/implicit/big endian, RLE, enhanced)."""
    specs = [("CT_small.dcm", ExplicitVRLittleEndian), ("MR_small.dcm", ImplicitVRLittleEndian),
             ("CT_small.dcm", ExplicitVRBigEndian), ("MR_small.dcm", RLELossless),
             ("emri_small.dcm", ExplicitVRLittleEndian)]
    seeds = []
    for name, ts in specs:
        ds = base_dataset(name)
        ds.SOPInstanceUID = SEED_SOP_INSTANCE_UID
        if ts == RLELossless:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.compress(RLELossless, generate_instance_uid=False)
        seeds.append(Seed(f"{name.removesuffix('.dcm')}-{pydicom.uid.UID(ts).keyword}",
                          encode(ds, ts), str(ds.SOPClassUID), ts))
    return seeds


def fresh_sop_instance_uid(token: int) -> str:
    """A UID as long as :data:`SEED_SOP_INSTANCE_UID`, unique per ``token`` (< 10**20)."""
    return SEED_SOP_INSTANCE_UID[:-20] + f"{token % 10**20:020d}".replace("0", "1", 1)


def instance_from(seed: Seed, body: bytes, token: int) -> tuple[bytes, str]:
    """The Part 10 file of a (mutated) seed body with a fresh SOP Instance UID.

    Returns
    -------
    tuple[bytes, str]
        The file and the Affected SOP Instance UID to send it under.
    """
    uid = fresh_sop_instance_uid(token)
    body = body.replace(SEED_SOP_INSTANCE_UID.encode(), uid.encode())
    return part10(body, seed.sop_class_uid, uid, seed.transfer_syntax_uid), uid


def mutate(body: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply mutations: ``("flip", pos, b"\\x0N")`` flips bit N, ``("truncate", pos, b"")``,
    ``("insert", pos, data)``, ``("overwrite", pos, data)``, ``("delete", pos, b"n")``
    (positions are taken modulo the current length)."""
    out = bytearray(body)
    for kind, position, value in ops:
        if not out:
            break
        pos = position % len(out)
        if kind == "flip":
            out[pos] ^= 1 << ((value[0] if value else 0) % 8)
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = value
        elif kind == "overwrite":
            out[pos:pos + len(value)] = value
        elif kind == "delete":
            del out[pos:pos + 1 + (value[0] if value else 0)]
        else:
            raise ValueError(kind)
    return bytes(out)


#: Statuses the receive path may answer with.
FAILURE_STATUSES = range(0xA700, 0xD000)


def check_received(node: object, data: bytes, sop_instance_uid: str, sop_class_uid: str) -> int:
    """Run one instance through ``StorageSCP.receive`` and check the receive-path invariants.

    Success only when the stored file parses with pydicom, passes the same checks again and
    its index row exists; a failure status leaves no row behind.  Nothing may escape.

    Parameters
    ----------
    node
        A :class:`dicom_node.app.Node` (not started: ``node.scp.receive`` needs no network).
    data, sop_instance_uid, sop_class_uid
        The Part 10 file and the C-STORE request it would arrive in.

    Returns
    -------
    int
        The status.

    Raises
    ------
    AssertionError
        An invariant does not hold.
    """
    from sqlalchemy import select

    from dicom_node.receive.validation import check_image, parse_dataset
    from storage.models import Instance

    status = node.scp.receive(data, sop_instance_uid, sop_class_uid,  # type: ignore[attr-defined]
                              "FUZZSCU", "127.0.0.1")
    with node.db.session() as s:  # type: ignore[attr-defined]
        path = s.execute(select(Instance.path).where(
            Instance.sop_instance_uid == sop_instance_uid)).scalar_one_or_none()
    if status == 0:
        assert path is not None, "success without an index row"
        stored = Path(path).read_bytes()
        assert stored == data, "stored file differs from what was received"
        ds = pydicom.dcmread(io.BytesIO(stored))
        assert str(ds.SOPInstanceUID) == sop_instance_uid
        check_image(parse_dataset(stored))
    else:
        assert status in FAILURE_STATUSES, f"status 0x{status:04X} outside 0xA700-0xCFFF"
        assert path is None, "refused instance was indexed"
    return status
