"""Raw DICOM upper-layer helpers for tests: an A-ASSOCIATE-RQ as bytes, one PDU read.

A requestor that reads the acceptor's answer itself sees exactly what the node sent.  pynetdicom's
requestor can miss a fast A-ASSOCIATE-RJ on a loaded machine (its DUL thread reads the rejection
and closes the transport before the requesting thread checks that it is connected, and the
association then reads as aborted), so the tests that check a rejection read it here.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import CTImageStorage, Verification

CT_EXPLICIT = "1.2.840.10008.1.2.1"


def associate_rq(calling: str = "RAWSCU", called: str = "SRNODE",
                 max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification and CT Image Storage (explicit VR LE)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    echo = build_context(Verification)
    echo.context_id = 1
    ct = build_context(CTImageStorage, [CT_EXPLICIT])
    ct.context_id = 3
    prim.presentation_context_definition_list = [echo, ct]
    item = MaximumLengthNotification()
    item.maximum_length_received = max_length
    prim.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU; ``(0, b"")`` when the connection is closed (or reset)."""
    buf = b""
    try:
        while len(buf) < 6:
            chunk = sock.recv(6 - len(buf))
            if not chunk:
                return 0, b""
            buf += chunk
        pdu_type, _, length = struct.unpack(">BBI", buf)
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return 0, b""
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        return 0, b""
    return pdu_type, body


@dataclass(frozen=True)
class AssociationAnswer:
    """What the acceptor answered to an A-ASSOCIATE-RQ.

    Attributes
    ----------
    pdu_type
        0x02 (A-ASSOCIATE-AC), 0x03 (A-ASSOCIATE-RJ), 0x07 (A-ABORT), 0 (connection closed).
    result, source, reason
        The A-ASSOCIATE-RJ fields (PS3.8 9.3.4); 0 for any other answer.
    """

    pdu_type: int
    result: int = 0
    source: int = 0
    reason: int = 0

    @property
    def rejected(self) -> bool:
        """Whether the answer was an A-ASSOCIATE-RJ."""
        return self.pdu_type == 0x03


def request_association(port: int, calling: str, called: str = "SRNODE",
                        timeout: float = 20.0) -> AssociationAnswer:
    """Send an A-ASSOCIATE-RQ over loopback and return the acceptor's answer.

    An accepted association is released at once (A-RELEASE-RQ, reply read); a rejected one is
    closed by us, as a requestor does after an A-ASSOCIATE-RJ.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(associate_rq(calling, called))
        pdu_type, body = read_pdu(sock)
        if pdu_type == 0x03 and len(body) >= 4:
            return AssociationAnswer(pdu_type, body[1], body[2], body[3])
        if pdu_type == 0x02:
            sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0")
            read_pdu(sock)
        return AssociationAnswer(pdu_type)
