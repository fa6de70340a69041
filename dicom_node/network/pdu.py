"""The DICOM Upper Layer wire format the acceptor speaks (PS3.8 9.3, PS3.7 E).

PDU and command-set constants, encoders, decoders and bounded socket reads.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from pynetdicom.sop_class import Verification

from dicom_node import __version__
from dicom_node.codes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_PREFIX

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"


IMPLEMENTATION_VERSION_NAME = (IMPLEMENTATION_VERSION_PREFIX + __version__)[:16]


VERIFICATION_SOP_CLASS = str(Verification)


# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_PDU = 0x01


P_DATA_TF_PDU = 0x04


A_RELEASE_RQ_PDU = 0x05


A_RELEASE_RP_PDU = 0x06


A_ABORT_PDU = 0x07


# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001


C_ECHO_RQ = 0x0030


C_CANCEL_RQ = 0x0FFF


NO_DATA_SET = 0x0101


#: Largest A-ASSOCIATE-RQ accepted (a real one is a few kilobytes; 128 contexts with several
#: transfer syntaxes each stay well below this).  It is read as it arrives, never allocated
#: from the announced length.
MAX_ASSOCIATE_RQ = 64 << 10


#: Largest DIMSE command set accepted (a real one is about 200 bytes; this leaves room for an
#: over-long UID, which gets a failure status instead of an abort).
MAX_COMMAND_SET = 256 << 10


#: A data set growing past this many bytes is moved to a spool file (service permitting) and
#: the rest appended there as it arrives, so memory per association stays below it.
SPOOL_THRESHOLD = 8 << 20


#: Bytes asked of the socket per read while negotiating.
NEGOTIATION_READ = 16 << 10


#: Largest P-DATA-TF accepted when no maximum is negotiated (0 = unlimited): bounds memory.
MAX_UNLIMITED_PDU = 64 << 20


# A-ASSOCIATE-RJ (result, source, diagnostic), as PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


REJECT_CALLED_AE = (0x01, 0x01, 0x07)


REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)


REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)


REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


# A-ABORT provider reasons (source 0x02)
ABORT_UNRECOGNISED_PDU = 0x01


ABORT_UNEXPECTED_PDU = 0x02


ABORT_INVALID_PARAMETER = 0x06


class AssociationAbortedError(Exception):
    """The peer broke the protocol (or the connection); the association is aborted."""

    def __init__(self, message: str, reason: int | None = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        #: Provider reason to send in an A-ABORT, ``None`` when the connection is gone.
        self.reason = reason


# -- encoding helpers -------------------------------------------------------------------------
def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def encode_abort(reason: int, source: int = 0x02) -> bytes:
    """Encode an A-ABORT PDU (``source`` 0x02: service provider, 0x00: service user)."""
    return encode_pdu(A_ABORT_PDU, bytes((0, 0, source, reason)))


RELEASE_RP = encode_pdu(A_RELEASE_RP_PDU, bytes(4))


def _element(group_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, group_elem, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_command(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """Encode a DIMSE command set (implicit VR little endian, group 0000, tags ascending).

    Parameters
    ----------
    fields
        ``(element number, encoded value)`` pairs of group 0000 without the group length.
    """
    body = b"".join(_element(elem, value) for elem, value in sorted(fields))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_response(command_field: int, message_id: int, status: int, sop_class_uid: str,
                    sop_instance_uid: str | None = None, error_comment: str = "") -> bytes:
    """Encode the command set of a C-STORE-RSP or C-ECHO-RSP (PS3.7 9.3.1.2 and 9.3.5.2)."""
    fields = [
        (0x0002, _uid_value(sop_class_uid)),
        (0x0100, struct.pack("<H", command_field | 0x8000)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid is not None:
        fields.append((0x1000, _uid_value(sop_instance_uid)))
    if error_comment and status not in (0x0000,) and status >> 12 != 0xB:
        comment = error_comment.encode("ascii", "replace")[:64]
        fields.append((0x0902, comment + b" " if len(comment) % 2 else comment))
    return encode_command(fields)


def decode_command(data: bytes) -> dict[int, bytes]:
    """Decode a DIMSE command set into ``{element number of group 0000: raw value}``.

    Raises
    ------
    AssociationAbortedError
        The command set is not a well-formed implicit VR little endian group 0000.
    """
    fields: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise AssociationAbortedError("truncated command set", ABORT_INVALID_PARAMETER)
        group, elem, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise AssociationAbortedError("malformed command set", ABORT_INVALID_PARAMETER)
        fields[elem] = bytes(data[offset:offset + length])
        offset += length
    return fields


def read_us(fields: dict[int, bytes], elem: int) -> int:
    """A required US command element; a missing or malformed one aborts the association."""
    value = fields.get(elem)
    if value is None or len(value) != 2:
        raise AssociationAbortedError(f"command element (0000,{elem:04X}) missing or not US",
                                      ABORT_INVALID_PARAMETER)
    return int(struct.unpack("<H", value)[0])


def read_us_or_none(fields: dict[int, bytes], elem: int) -> int | None:
    """An optional US command element (``None`` when missing or malformed)."""
    value = fields.get(elem)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def read_ui(fields: dict[int, bytes], elem: int) -> str:
    """A UI command element as text (padding removed; not validated here)."""
    return fields.get(elem, b"").rstrip(b"\0 ").decode("ascii", "replace")


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae_title: str) -> bytes:
    """Encode the Part 10 preamble, prefix and File Meta Information (PS3.10 7.1)."""
    def el(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB",):
            return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
        return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value

    def text(value: str) -> bytes:
        raw = value.encode("ascii", "replace")
        return raw + b" " if len(raw) % 2 else raw

    body = b"".join((
        el(0x0001, b"OB", b"\x00\x01"),
        el(0x0002, b"UI", _uid_value(sop_class_uid)),
        el(0x0003, b"UI", _uid_value(sop_instance_uid)),
        el(0x0010, b"UI", _uid_value(transfer_syntax_uid)),
        el(0x0012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID)),
        el(0x0013, b"SH", text(IMPLEMENTATION_VERSION_NAME)),
        el(0x0016, b"AE", text(source_ae_title.strip()[:16])),
    ))
    return bytes(128) + b"DICM" + el(0x0000, b"UL", struct.pack("<I", len(body))) + body


# -- the association ---------------------------------------------------------------------------
def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly ``n`` bytes (the peer closing early raises ``ConnectionError``)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise AssociationAbortedError("connection closed by the peer", None)
        got += k
    return buf


def _read_pdu_header(sock: socket.socket, max_length: int) -> tuple[int, int]:
    """Read a PDU header; return the PDU type and the announced body length (checked)."""
    pdu_type, _, length = struct.unpack(">BBI", recv_exact(sock, 6))
    if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
        raise AssociationAbortedError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
    if length > max_length:
        raise AssociationAbortedError(f"PDU of {length} bytes exceeds {max_length}",
                                      ABORT_INVALID_PARAMETER)
    return pdu_type, length


def read_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    """Read one PDU; return its type and body.

    Raises
    ------
    AssociationAbortedError
        Connection closed, unknown PDU type or a PDU longer than ``max_length``.
    """
    pdu_type, length = _read_pdu_header(sock, max_length)
    return pdu_type, recv_exact(sock, length)


def read_request_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    """Read one PDU of a connection still negotiating, holding only what has arrived.

    Unlike :func:`read_pdu` the body is never allocated from the announced length: a peer
    announcing 1 MiB and sending nothing costs a few bytes, not a megabyte.

    Raises
    ------
    AssociationAbortedError
        Connection closed, unknown PDU type or a PDU longer than ``max_length``.
    """
    pdu_type, length = _read_pdu_header(sock, max_length)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(NEGOTIATION_READ, length - len(body)))
        if not chunk:
            raise AssociationAbortedError("connection closed by the peer", None)
        body += chunk
    return pdu_type, body
