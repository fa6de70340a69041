"""A lean DICOM Upper Layer acceptor (PS3.8) for the storage service.

pynetdicom runs every association on three threads (socket reader, state machine, DIMSE
reactor) that hand each PDU over through polled queues and encode every response with pydicom;
on a 2-core machine that costs more than srnode's whole durable receive path.  This acceptor runs
one association on one thread: it blocks on the socket, reads a PDU straight into one buffer,
hands a complete data set to the storage callback and answers with a pre-encoded command set.

Association negotiation reuses pynetdicom's PDU codec and presentation-context negotiation
(:func:`pynetdicom.presentation.negotiate_as_acceptor`); only the data-transfer phase (P-DATA,
C-ECHO and C-STORE command sets, release and abort) is handled here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification

from dicom_node import __version__
from dicom_node.codes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_PREFIX
from dicom_node.log_safety import is_valid_ae_title, is_valid_uid, safe_ae, safe_text
from dicom_node.network import statuses
from dicom_node.network.admission import ConnectionBudget
from dicom_node.network.dataset_buffer import DataSetBuffer
from storage.spool import Spool

LOGGER = logging.getLogger(__name__)

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
_NEGOTIATION_READ = 16 << 10
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


@dataclass(frozen=True)
class Peer:
    """The requestor of an association."""

    ae_title: str
    address: str
    port: int
    called_ae_title: str


@dataclass(frozen=True)
class AcceptorPolicy:
    """Who may associate and how.

    Parameters
    ----------
    ae_title
        This node's AE title.
    require_called_ae_title
        Reject requests whose Called AE Title is not ``ae_title``.
    allowed_calling_ae_titles
        Calling AE titles accepted (empty: any, unless ``allowed_hosts`` names some).
    allowed_hosts
        Calling AE title -> host addresses it may connect from.
    max_associations
        Most simultaneous negotiated associations; more are rejected (local limit exceeded).
        Connections still negotiating never take these slots.
    acse_timeout
        Deadline in seconds for the whole negotiation of a connection: TLS handshake and the
        complete A-ASSOCIATE-RQ (not per read: a dripping peer is cut off at the deadline).
    network_timeout
        Seconds of silence between messages after which an established association is closed.
    dimse_timeout
        Seconds to wait for the next fragment of a message already started.
    max_pdu_size
        Maximum PDU length announced to requestors (0 = unlimited).
    contexts
        Supported presentation contexts (abstract syntax + transfer syntaxes).
    max_instance_bytes
        Largest data set accepted in one C-STORE (0 = no limit); a larger one is discarded as
        it arrives (never held) and answered with ``statuses.INSTANCE_TOO_LARGE``.
    max_pending
        Most connections negotiating at once (TLS handshake or A-ASSOCIATE-RQ not complete);
        more are closed at once, before a thread or a buffer is given to them.
    max_pending_per_host
        Most connections negotiating at once from one source address.
    """

    ae_title: str
    require_called_ae_title: bool
    allowed_calling_ae_titles: Sequence[str]
    allowed_hosts: dict[str, list[str]]
    max_associations: int
    acse_timeout: float
    network_timeout: float
    max_pdu_size: int
    dimse_timeout: float = 60.0
    contexts: Sequence[PresentationContext] = field(default_factory=list)
    max_instance_bytes: int = 0
    max_pending: int = 32
    max_pending_per_host: int = 8

    def check_requestor(self, calling: str, called: str, address: str) -> tuple[int, ...] | None:
        """Return the A-ASSOCIATE-RJ triple for a requestor that is not allowed, else ``None``."""
        allowed = [a.strip() for a in self.allowed_calling_ae_titles]
        hosts = {k.strip(): v for k, v in self.allowed_hosts.items()}
        if allowed or hosts:
            candidates = allowed or list(hosts)
            if calling not in candidates or (calling in hosts and address not in hosts[calling]):
                return REJECT_CALLING_AE
        if self.require_called_ae_title and called != self.ae_title.strip():
            return REJECT_CALLED_AE
        return None


class StorageService:
    """What the acceptor calls; :class:`dicom_node.network.scp.StorageSCP` implements it."""

    def on_rejected(self, peer: Peer, reason: str) -> None:
        """An association request was rejected."""

    def on_accepted(self, peer: Peer, rejected: list[PresentationContext]) -> None:
        """An association was accepted; ``rejected`` lists the refused contexts."""

    def on_echo(self, peer: Peer) -> int:
        """Answer a C-ECHO; return its status."""
        return statuses.SUCCESS

    def on_store(self, data: bytes | Spool, affected_sop_instance_uid: str,
                 sop_class_uid: str, peer: Peer) -> int:
        """Store a received Part 10 file; return the C-STORE status.

        A spooled file (:class:`storage.spool.Spool`) is the service's to hand over or discard.
        """
        raise NotImplementedError

    def open_spool(self) -> Spool | None:
        """Return an empty spool file for a large data set being received.

        ``None`` keeps the data set in memory.  An :class:`OSError` (disk full) refuses the
        C-STORE with ``statuses.OUT_OF_RESOURCES``.
        """
        return None

    def on_store_refused(self, peer: Peer, status: int, reason: str,
                         affected_sop_instance_uid: str) -> int:
        """A C-STORE was refused by the acceptor itself (malformed command, too large).

        Parameters
        ----------
        peer
            The requestor.
        status
            The failure status about to be answered.
        reason
            Why (srnode's words, no peer data).
        affected_sop_instance_uid
            As sent by the peer (may be invalid: neutralise before logging).

        Returns
        -------
        int
            The status to answer (normally ``status``).
        """
        return status

    def on_negotiation_failed(self, address: str, reason: str, peer: Peer | None) -> None:
        """A connection ended before an association was established (or was refused at once).

        Parameters
        ----------
        address
            Source address of the connection.
        reason
            What happened (TLS handshake failed, deadline passed, protocol error, budget).
        peer
            The requestor, when its A-ASSOCIATE-RQ was decoded.
        """


# -- encoding helpers -------------------------------------------------------------------------
def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def encode_abort(reason: int, source: int = 0x02) -> bytes:
    """Encode an A-ABORT PDU (``source`` 0x02: service provider, 0x00: service user)."""
    return _pdu(A_ABORT_PDU, bytes((0, 0, source, reason)))


RELEASE_RP = _pdu(A_RELEASE_RP_PDU, bytes(4))


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


def _us(fields: dict[int, bytes], elem: int) -> int:
    value = fields.get(elem)
    if value is None or len(value) != 2:
        raise AssociationAbortedError(f"command element (0000,{elem:04X}) missing or not US",
                                 ABORT_INVALID_PARAMETER)
    return int(struct.unpack("<H", value)[0])


def _us_or_none(fields: dict[int, bytes], elem: int) -> int | None:
    value = fields.get(elem)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def _ui(fields: dict[int, bytes], elem: int) -> str:
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
def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise AssociationAbortedError("connection closed by the peer", None)
        got += k
    return buf


def read_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    """Read one PDU; return its type and body.

    Raises
    ------
    AssociationAbortedError
        Connection closed, unknown PDU type or a PDU longer than ``max_length``.
    """
    header = _recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
        raise AssociationAbortedError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
    if length > max_length:
        raise AssociationAbortedError(f"PDU of {length} bytes exceeds {max_length}",
                                 ABORT_INVALID_PARAMETER)
    return pdu_type, _recv_exact(sock, length)


def read_request_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    """Read one PDU of a connection still negotiating, holding only what has arrived.

    Unlike :func:`read_pdu` the body is never allocated from the announced length: a peer
    announcing 1 MiB and sending nothing costs a few bytes, not a megabyte.

    Raises
    ------
    AssociationAbortedError
        Connection closed, unknown PDU type or a PDU longer than ``max_length``.
    """
    header = _recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
        raise AssociationAbortedError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
    if length > max_length:
        raise AssociationAbortedError(f"PDU of {length} bytes exceeds {max_length}",
                                      ABORT_INVALID_PARAMETER)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(_NEGOTIATION_READ, length - len(body)))
        if not chunk:
            raise AssociationAbortedError("connection closed by the peer", None)
        body += chunk
    return pdu_type, body


class Association:
    """One association on one thread: negotiation, then the data-transfer loop.

    Parameters
    ----------
    sock
        The connected (and, with TLS, wrapped) socket.
    address
        ``(host, port)`` of the peer.
    policy
        Who may associate and how.
    service
        Receives the C-ECHO and C-STORE requests.
    active
        Callable returning the number of associations currently open (this one included).
    admit
        Callable taking a negotiated slot for this connection (``False``: none free); when
        given it replaces the ``active`` count.
    stopping
        Set when the node stops: after the message in flight the association is aborted.
    """

    def __init__(self, sock: socket.socket, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, active: Callable[[], int],
                 admit: Callable[[], bool] | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.sock = sock
        self.address = address
        self.policy = policy
        self.service = service
        self.active = active
        self.admit = admit
        self.stopping = stopping
        self.peer: Peer | None = None
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_length = 0
        #: Held while a message is being received, stored or answered (graceful stop waits).
        self.lock = threading.Lock()
        self.established = False
        self.in_message = False
        self.closing = False
        self.deadline = time.monotonic() + (policy.acse_timeout or 3600.0)
        #: The data set in flight (its spool file is removed if the association ends first).
        self._buffer: DataSetBuffer | None = None

    # -- negotiation --------------------------------------------------------------------------
    def negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and accept or reject it; return whether it was accepted."""
        self.sock.settimeout(self.policy.acse_timeout or None)
        pdu_type, body = read_request_pdu(self.sock, MAX_ASSOCIATE_RQ)
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise AssociationAbortedError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        # AE titles are checked before pynetdicom decodes them: its codec logs an invalid value
        # as sent, and a malformed title deserves an A-ASSOCIATE-RJ (audited), not an abort.
        called_raw, calling_raw = bytes(body[4:20]), bytes(body[20:36])
        for raw, triple, what in ((calling_raw, REJECT_CALLING_AE, "calling"),
                                  (called_raw, REJECT_CALLED_AE, "called")):
            if len(raw) == 16 and not is_valid_ae_title(raw.decode("latin-1").strip()):
                self.peer = Peer(calling_raw.decode("latin-1"), self.address[0],
                                 self.address[1], called_raw.decode("latin-1"))
                self._reject(triple, f"malformed {what} AE title")
                return False
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(bytes(struct.pack(">BBI", pdu_type, 0, len(body)) + body))
            request = pdu.to_primitive()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's PDU
            raise AssociationAbortedError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})",
                                     ABORT_INVALID_PARAMETER) from exc
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        self.peer = Peer(calling, self.address[0], self.address[1], called)
        for item in request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_length = int(item.maximum_length_received or 0)
        reject = self.policy.check_requestor(calling, called, self.address[0])
        reason = "calling AE title not allowed (or not from its host)"
        if reject == REJECT_CALLED_AE:
            reason = "called AE title is not this node's"
        if not is_valid_ae_title(calling):
            reject, reason = REJECT_CALLING_AE, "malformed calling AE title"
        elif not is_valid_ae_title(called):
            reject, reason = REJECT_CALLED_AE, "malformed called AE title"
        if reject is None and pdu.protocol_version != 0x0001:
            reject, reason = REJECT_PROTOCOL_VERSION, "protocol version not supported"
        if reject is None and str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            reject, reason = REJECT_APPLICATION_CONTEXT, "application context not supported"
        if reject is None:
            full = (not self.admit()) if self.admit is not None else (
                self.active() > self.policy.max_associations)
            if full:
                reject, reason = REJECT_LOCAL_LIMIT, "too many associations"
        if reject is not None:
            self._reject(reject, reason)
            return False
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list, list(self.policy.contexts), roles
        )
        self.contexts = {int(cx.context_id): cx for cx in results
                         if cx.result == 0x00 and cx.context_id is not None}
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.policy.max_pdu_size
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [max_length, class_uid, version, *role_items]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        self.sock.sendall(ac.encode())
        self.established = True
        self.service.on_accepted(self.peer, [cx for cx in results if cx.result != 0x00])
        return True

    def _reject(self, reject: tuple[int, ...], reason: str) -> None:
        """Send an A-ASSOCIATE-RJ and tell the service."""
        assert self.peer is not None
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = reject
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        self.sock.sendall(rj.encode())
        self.service.on_rejected(self.peer, reason)

    # -- data transfer ------------------------------------------------------------------------
    def _send_command(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max_length - 6 if self.peer_max_length > 6 else len(command)
        chunks = [command[i:i + limit] for i in range(0, len(command), limit)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            control = 0x03 if i == len(chunks) - 1 else 0x01
            item = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
            out.append(_pdu(P_DATA_TF_PDU, item))
        with self.lock:  # never interleaved with an A-ABORT sent by stop()
            if self.closing:
                raise AssociationAbortedError("aborted while the node stops", None)
            self.sock.sendall(b"".join(out))

    def serve(self) -> None:
        """Run the data-transfer phase until release, abort, timeout or the node stopping.

        Memory per association is bounded whatever the peer sends: one PDU (at most the
        negotiated maximum), the command set (``MAX_COMMAND_SET``) and one data set in memory
        up to ``SPOOL_THRESHOLD`` (then in a spool file, up to ``max_instance_bytes``; see
        :class:`dicom_node.network.dataset_buffer.DataSetBuffer`).  Empty PDV items that are not the
        last fragment of a message abort the association.
        """
        idle_timeout = self.policy.network_timeout or None
        busy_timeout = self.policy.dimse_timeout or None
        timeout = idle_timeout
        self.sock.settimeout(timeout)
        limit = self.policy.max_pdu_size + 6 if self.policy.max_pdu_size else MAX_UNLIMITED_PDU
        command = bytearray()
        pending: tuple[int, dict[int, bytes]] | None = None  # context id, command awaiting data
        while True:
            idle = pending is None and not command
            if idle:
                with self.lock:
                    self.in_message = False
                    if self.closing or (self.stopping is not None and self.stopping.is_set()):
                        raise AssociationAbortedError("the node is stopping", 0x00)
            wanted = idle_timeout if idle else busy_timeout
            if wanted != timeout:
                timeout = wanted
                self.sock.settimeout(timeout)
            pdu_type, body = read_pdu(self.sock, limit)
            if pdu_type == A_RELEASE_RQ_PDU:
                if not idle:
                    LOGGER.warning("association from %r released in the middle of a message",
                                   safe_ae(self.peer.ae_title) if self.peer else "?")
                self.sock.sendall(RELEASE_RP)
                return
            if pdu_type == A_ABORT_PDU:
                raise AssociationAbortedError("aborted by the peer", None)
            if pdu_type != P_DATA_TF_PDU:
                raise AssociationAbortedError(f"unexpected PDU type 0x{pdu_type:02X}")
            if idle:
                with self.lock:
                    if self.closing:  # aborted by stop() while this PDU was on its way
                        raise AssociationAbortedError("the node is stopping", None)
                    self.in_message = True
            view = memoryview(body)
            offset, end = 0, len(body)
            while offset < end:
                if offset + 6 > end:
                    raise AssociationAbortedError("truncated PDV item", ABORT_INVALID_PARAMETER)
                item_length, context_id, control = struct.unpack_from(">IBB", body, offset)
                if item_length < 2 or offset + 4 + item_length > end:
                    raise AssociationAbortedError("PDV item length beyond the PDU",
                                             ABORT_INVALID_PARAMETER)
                if item_length == 2 and not control & 0x02:
                    # An empty fragment carries nothing and is only tolerated as the last one
                    # (pynetdicom sends an empty data set that way); a stream of them is abuse.
                    raise AssociationAbortedError("empty PDV item", ABORT_INVALID_PARAMETER)
                value = view[offset + 6:offset + 4 + item_length]
                offset += 4 + item_length
                if context_id not in self.contexts:
                    raise AssociationAbortedError(f"presentation context {context_id} not accepted",
                                             ABORT_INVALID_PARAMETER)
                if control & 0x01:  # command fragment
                    if pending is not None:
                        raise AssociationAbortedError("command received before the data set ended")
                    if len(command) + len(value) > MAX_COMMAND_SET:
                        raise AssociationAbortedError("command set too large",
                                                      ABORT_INVALID_PARAMETER)
                    command += value
                    if control & 0x02:
                        fields = decode_command(command)
                        command = bytearray()
                        if _us(fields, 0x0800) == NO_DATA_SET:
                            self._dispatch(context_id, fields, None)
                        else:
                            pending = (context_id, fields)
                            self._buffer = self._begin_dataset(context_id, fields)
                else:  # data set fragment
                    if pending is None or pending[0] != context_id:
                        raise AssociationAbortedError("data set fragment without its command")
                    assert self._buffer is not None
                    self._buffer.add(value)
                    if control & 0x02:
                        fields = pending[1]
                        pending = None
                        buffer, self._buffer = self._buffer, None
                        self._dispatch(context_id, fields, buffer)

    def _drop_buffer(self) -> None:
        """Discard the data set in flight (memory and spool file), if there is one."""
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.discard()

    def _begin_dataset(self, context_id: int, fields: dict[int, bytes]) -> DataSetBuffer:
        """Return the buffer a data set is received into (a C-STORE's with its file meta first).

        Anything but a C-STORE with an Affected SOP Instance UID that fits a UI element is only
        counted as it arrives, never kept.
        """
        command_field = fields.get(0x0100)
        sop_instance = _ui(fields, 0x1000)
        prefix: bytes | None = None
        if command_field == struct.pack("<H", C_STORE_RQ) and len(sop_instance) <= 64:
            assert self.peer is not None
            context = self.contexts[context_id]
            prefix = file_meta(str(context.abstract_syntax), sop_instance,
                               str(context.transfer_syntax[0]), self.peer.ae_title)
        return DataSetBuffer(prefix, self.policy.max_instance_bytes, SPOOL_THRESHOLD,
                             self.service.open_spool)

    def _dispatch(self, context_id: int, fields: dict[int, bytes],
                  buffer: DataSetBuffer | None) -> None:
        try:
            self._answer(context_id, fields, buffer)
        finally:
            if buffer is not None:
                buffer.discard()  # no-op once handed over

    def _answer(self, context_id: int, fields: dict[int, bytes],
                buffer: DataSetBuffer | None) -> None:
        command_field = _us(fields, 0x0100)
        if command_field == C_CANCEL_RQ:
            return
        context = self.contexts[context_id]
        abstract = str(context.abstract_syntax)
        assert self.peer is not None
        message_id = _us_or_none(fields, 0x0110)
        if message_id is None:
            LOGGER.warning("DIMSE command 0x%04X from %r without a valid Message ID refused",
                           command_field, safe_ae(self.peer.ae_title))
            self._send_command(context_id, encode_response(
                command_field & 0x7FFF, 0, statuses.CANNOT_UNDERSTAND, abstract))
            return
        if command_field == C_ECHO_RQ and abstract == VERIFICATION_SOP_CLASS:
            status = self.service.on_echo(self.peer)
            self._send_command(context_id, encode_response(
                C_ECHO_RQ, message_id, status, VERIFICATION_SOP_CLASS))
            return
        if command_field == C_STORE_RQ and buffer is not None:
            sop_class = _ui(fields, 0x0002)
            sop_class = sop_class if is_valid_uid(sop_class) else abstract
            sop_instance = _ui(fields, 0x1000)
            echoed: str | None = sop_instance if len(sop_instance) <= 64 else None
            data = buffer.take() if echoed is not None else None
            if echoed is None:
                status = self.service.on_store_refused(
                    self.peer, statuses.INVALID_UID,
                    f"Affected SOP Instance UID of {len(sop_instance)} bytes (at most 64)",
                    sop_instance)
            elif buffer.dropped is not None:
                status = self.service.on_store_refused(
                    self.peer, buffer.dropped[0],
                    f"{buffer.dropped[1]}; {buffer.received} bytes received", sop_instance)
            elif data is None:
                status = self.service.on_store_refused(
                    self.peer, statuses.CANNOT_UNDERSTAND, "no data set", sop_instance)
            else:
                status = self.service.on_store(data, sop_instance, abstract, self.peer)
            self._send_command(context_id, encode_response(
                C_STORE_RQ, message_id, status, sop_class, echoed))
            return
        LOGGER.warning("DIMSE command 0x%04X on %s refused (unrecognised operation)",
                       command_field, abstract)
        self._send_command(context_id, encode_response(
            command_field & 0x7FFF, message_id, statuses.UNRECOGNIZED_OPERATION, abstract))

    def run(self) -> None:
        """Negotiate, serve and close; never raises."""
        try:
            self._run()
        finally:
            self._drop_buffer()

    def _run(self) -> None:
        try:
            if self.negotiate():
                self.serve()
        except AssociationAbortedError as exc:
            who = safe_ae(self.peer.ae_title) if self.peer else self.address[0]
            if exc.reason is not None:
                LOGGER.warning("aborting association with %r: %s", who, exc)
                self._abort(exc.reason)
            else:
                LOGGER.info("association with %r ended: %s", who, exc)
            if not self.established:
                self._negotiation_failed(str(exc))
        except TimeoutError:
            LOGGER.warning("association with %r timed out (no data within the timeout)",
                           safe_ae(self.peer.ae_title) if self.peer else self.address[0])
            self._abort(0x00)
            if not self.established:
                self._negotiation_failed("no complete association request within acse_timeout")
        except (OSError, ssl.SSLError) as exc:
            LOGGER.info("connection from %s closed: %s", self.address[0], exc)
            if not self.established:
                self._negotiation_failed(f"connection closed ({type(exc).__name__})")
        except Exception:  # noqa: BLE001 - never let one association kill the server
            LOGGER.exception("unexpected error in an association from %s", self.address[0])
            self._abort(0x00)
            if not self.established:
                self._negotiation_failed("unexpected error")

    def _abort(self, reason: int) -> None:
        """Send an A-ABORT (service provider) unless stop() already did."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
        with contextlib.suppress(OSError):
            self.sock.sendall(encode_abort(reason))

    def abort_for_stop(self, force: bool) -> bool:
        """Abort the association for a node stop unless a message is in flight.

        Parameters
        ----------
        force
            Abort even in the middle of a message (the grace period is over).

        Returns
        -------
        bool
            Whether the A-ABORT was sent (or the association was already closing).
        """
        with self.lock:
            if self.closing:
                return True
            if self.in_message and not force:
                return False
            self.closing = True
            with contextlib.suppress(OSError):
                self.sock.sendall(encode_abort(0x00))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return True

    def _negotiation_failed(self, reason: str) -> None:
        if time.monotonic() >= self.deadline - 0.05:
            reason = f"no complete association request within acse_timeout ({reason})"
        with contextlib.suppress(Exception):
            self.service.on_negotiation_failed(self.address[0], reason, self.peer)


class _Handler(socketserver.BaseRequestHandler):
    server: StorageAcceptor

    def handle(self) -> None:
        self.server.handle_connection(self.request, self.client_address)


class StorageAcceptor(socketserver.ThreadingTCPServer):
    """Listens for associations; one thread per association.

    Connections still negotiating have their own small budget and a deadline, and only an
    accepted association takes one of the ``policy.max_associations`` slots
    (:class:`dicom_node.network.admission.ConnectionBudget`).

    Parameters
    ----------
    address
        ``(host, port)`` to bind (port 0: any free port).
    policy
        Who may associate and how.
    service
        Receives C-ECHO and C-STORE requests.
    ssl_context
        Server-side TLS context (``None``: plain TCP).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, ssl_context: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.policy = policy
        self.service = service
        self.ssl_context = ssl_context
        self.budget = ConnectionBudget(policy.max_pending, policy.max_pending_per_host,
                                       policy.max_associations, policy.acse_timeout,
                                       self._report_refused)
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None

    def active_count(self) -> int:
        """Connections currently open."""
        return self.budget.count()

    def negotiated_count(self) -> int:
        """Associations currently established (the ones ``max_associations`` counts)."""
        return self.budget.negotiated_count()

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int] | str) -> bool:
        """Admit a new connection to the negotiating budget (accept thread).

        Returns
        -------
        bool
            ``False`` closes the connection at once.
        """
        assert isinstance(request, socket.socket)
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        return self.budget.admit_connection(request, host)

    def _report_refused(self, host: str, reason: str) -> None:
        LOGGER.warning("connection from %s closed before negotiation: %s", host, reason)
        self.service.on_negotiation_failed(host, f"connection refused: {reason}", None)

    # -- one connection -----------------------------------------------------------------------
    def handle_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Run one association on the calling thread (socketserver's per-connection thread)."""
        conn = self.budget.connection(sock, str(address[0]))
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wrapped = sock
            if self.ssl_context is not None:
                sock.settimeout(self.policy.acse_timeout or None)
                try:
                    wrapped = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    why = "deadline passed" if conn.expired else safe_text(str(exc), 200)
                    LOGGER.warning("TLS handshake with %s failed: %s", address[0], why)
                    with contextlib.suppress(Exception):
                        self.service.on_negotiation_failed(
                            str(address[0]), f"TLS handshake failed: {why}", None)
                    return
            association = Association(
                wrapped, (str(address[0]), int(address[1])), self.policy, self.service,
                self.active_count, admit=lambda: self.budget.take_slot(sock),
                stopping=self.budget.stopping)
            with self.budget.lock:
                conn.association = association
            association.run()
            if wrapped is not sock:
                with contextlib.suppress(OSError, ssl.SSLError):
                    wrapped.close()
        finally:
            self.budget.release(sock)

    def start(self) -> None:
        """Serve in a background thread (and the negotiation reaper in another)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="srnode-scp", daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self.budget.reap_forever, name="srnode-scp-reaper",
                                        daemon=True)
        self._reaper.start()

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let messages in flight finish for ``grace`` seconds, abort the rest.

        Connections still negotiating are closed at once; established associations between
        messages get an A-ABORT at once; an association receiving or storing a message is
        aborted right after its answer is sent, or when ``grace`` runs out.

        Parameters
        ----------
        grace
            Seconds to wait for messages in flight (0: abort everything now).
        """
        self.budget.stopping.set()
        self.shutdown()  # no new connections are accepted once this returns
        self.server_close()  # the listening socket: later connection attempts are refused
        deadline = time.monotonic() + max(0.0, grace)
        while True:
            conns = self.budget.snapshot()
            force = time.monotonic() >= deadline
            busy = 0
            for sock, conn in conns:
                if conn.association is None or not conn.association.established:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                elif not conn.association.abort_for_stop(force):
                    busy += 1
            if not busy or force:
                break
            time.sleep(0.05)
        # Give the association threads a moment to finish what they were doing (an index
        # commit under way) before the caller closes the database.
        end = time.monotonic() + 5.0
        for _, conn in conns:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(max(0.0, end - time.monotonic()))
