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
from dicom_node.network import statuses

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

#: Largest A-ASSOCIATE-RQ accepted (a real one is a few kilobytes).
MAX_ASSOCIATE_RQ = 1 << 20
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
        Most simultaneous associations; more are rejected (local limit exceeded).
    acse_timeout
        Seconds to wait for the A-ASSOCIATE-RQ (and the TLS handshake).
    network_timeout
        Seconds of silence between messages after which an established association is closed.
    dimse_timeout
        Seconds to wait for the next fragment of a message already started.
    max_pdu_size
        Maximum PDU length announced to requestors (0 = unlimited).
    contexts
        Supported presentation contexts (abstract syntax + transfer syntaxes).
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

    def on_store(self, data: bytes, affected_sop_instance_uid: str, sop_class_uid: str,
                 peer: Peer) -> int:
        """Store a received Part 10 file; return the C-STORE status."""
        raise NotImplementedError


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
    """

    def __init__(self, sock: socket.socket, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, active: Callable[[], int]) -> None:
        self.sock = sock
        self.address = address
        self.policy = policy
        self.service = service
        self.active = active
        self.peer: Peer | None = None
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_length = 0

    # -- negotiation --------------------------------------------------------------------------
    def negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and accept or reject it; return whether it was accepted."""
        self.sock.settimeout(self.policy.acse_timeout or None)
        pdu_type, body = read_pdu(self.sock, MAX_ASSOCIATE_RQ)
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise AssociationAbortedError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
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
        if reject is None and pdu.protocol_version != 0x0001:
            reject, reason = REJECT_PROTOCOL_VERSION, "protocol version not supported"
        if reject is None and str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            reject, reason = REJECT_APPLICATION_CONTEXT, "application context not supported"
        if reject is None and self.active() > self.policy.max_associations:
            reject, reason = REJECT_LOCAL_LIMIT, "too many associations"
        if reject is not None:
            primitive = A_ASSOCIATE()
            primitive.result, primitive.result_source, primitive.diagnostic = reject
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(primitive)
            self.sock.sendall(rj.encode())
            self.service.on_rejected(self.peer, reason)
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
        self.service.on_accepted(self.peer, [cx for cx in results if cx.result != 0x00])
        return True

    # -- data transfer ------------------------------------------------------------------------
    def _send_command(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max_length - 6 if self.peer_max_length > 6 else len(command)
        chunks = [command[i:i + limit] for i in range(0, len(command), limit)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            control = 0x03 if i == len(chunks) - 1 else 0x01
            item = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
            out.append(_pdu(P_DATA_TF_PDU, item))
        self.sock.sendall(b"".join(out))

    def serve(self) -> None:
        """Run the data-transfer phase until release, abort or timeout."""
        idle_timeout = self.policy.network_timeout or None
        busy_timeout = self.policy.dimse_timeout or None
        timeout = idle_timeout
        self.sock.settimeout(timeout)
        limit = self.policy.max_pdu_size + 6 if self.policy.max_pdu_size else MAX_UNLIMITED_PDU
        command: list[memoryview] = []
        dataset: list[memoryview] = []
        pending: tuple[int, dict[int, bytes]] | None = None  # context id, command awaiting data
        while True:
            wanted = busy_timeout if (pending is not None or command) else idle_timeout
            if wanted != timeout:
                timeout = wanted
                self.sock.settimeout(timeout)
            pdu_type, body = read_pdu(self.sock, limit)
            if pdu_type == A_RELEASE_RQ_PDU:
                if pending is not None or command:
                    LOGGER.warning("association from %r released in the middle of a message",
                                   self.peer.ae_title if self.peer else "?")
                self.sock.sendall(RELEASE_RP)
                return
            if pdu_type == A_ABORT_PDU:
                raise AssociationAbortedError("aborted by the peer", None)
            if pdu_type != P_DATA_TF_PDU:
                raise AssociationAbortedError(f"unexpected PDU type 0x{pdu_type:02X}")
            view = memoryview(body)
            offset, end = 0, len(body)
            while offset < end:
                if offset + 6 > end:
                    raise AssociationAbortedError("truncated PDV item", ABORT_INVALID_PARAMETER)
                item_length, context_id, control = struct.unpack_from(">IBB", body, offset)
                if item_length < 2 or offset + 4 + item_length > end:
                    raise AssociationAbortedError("PDV item length beyond the PDU",
                                             ABORT_INVALID_PARAMETER)
                value = view[offset + 6:offset + 4 + item_length]
                offset += 4 + item_length
                if context_id not in self.contexts:
                    raise AssociationAbortedError(f"presentation context {context_id} not accepted",
                                             ABORT_INVALID_PARAMETER)
                if control & 0x01:  # command fragment
                    if pending is not None:
                        raise AssociationAbortedError("command received before the data set ended")
                    command.append(value)
                    if control & 0x02:
                        fields = decode_command(b"".join(command))
                        command = []
                        if _us(fields, 0x0800) == NO_DATA_SET:
                            self._dispatch(context_id, fields, None)
                        else:
                            pending = (context_id, fields)
                else:  # data set fragment
                    if pending is None or pending[0] != context_id:
                        raise AssociationAbortedError("data set fragment without its command")
                    dataset.append(value)
                    if control & 0x02:
                        fields = pending[1]
                        pending = None
                        self._dispatch(context_id, fields, dataset)
                        dataset = []

    def _dispatch(self, context_id: int, fields: dict[int, bytes],
                  dataset: list[memoryview] | None) -> None:
        command_field = _us(fields, 0x0100)
        if command_field == C_CANCEL_RQ:
            return
        message_id = _us(fields, 0x0110)
        context = self.contexts[context_id]
        abstract = str(context.abstract_syntax)
        assert self.peer is not None
        if command_field == C_ECHO_RQ and abstract == VERIFICATION_SOP_CLASS:
            status = self.service.on_echo(self.peer)
            self._send_command(context_id, encode_response(
                C_ECHO_RQ, message_id, status, VERIFICATION_SOP_CLASS))
            return
        if command_field == C_STORE_RQ and dataset is not None:
            sop_class = _ui(fields, 0x0002) or abstract
            sop_instance = _ui(fields, 0x1000)
            ts = str(context.transfer_syntax[0])
            data = b"".join([file_meta(abstract, sop_instance, ts, self.peer.ae_title),
                             *dataset])
            status = self.service.on_store(data, sop_instance, abstract, self.peer)
            self._send_command(context_id, encode_response(
                C_STORE_RQ, message_id, status, sop_class, sop_instance))
            return
        LOGGER.warning("DIMSE command 0x%04X on %s refused (unrecognised operation)",
                       command_field, abstract)
        self._send_command(context_id, encode_response(
            command_field & 0x7FFF, message_id, statuses.UNRECOGNIZED_OPERATION, abstract))

    def run(self) -> None:
        """Negotiate, serve and close; never raises."""
        try:
            if self.negotiate():
                self.serve()
        except AssociationAbortedError as exc:
            who = self.peer.ae_title if self.peer else self.address[0]
            if exc.reason is not None:
                LOGGER.warning("aborting association with %r: %s", who, exc)
                with contextlib.suppress(OSError):
                    self.sock.sendall(encode_abort(exc.reason))
            else:
                LOGGER.info("association with %r ended: %s", who, exc)
        except TimeoutError:
            LOGGER.warning("association with %r timed out (no data within the timeout)",
                           self.peer.ae_title if self.peer else self.address[0])
            with contextlib.suppress(OSError):
                self.sock.sendall(encode_abort(0x00))
        except (OSError, ssl.SSLError) as exc:
            LOGGER.info("connection from %s closed: %s", self.address[0], exc)
        except Exception:  # noqa: BLE001 - never let one association kill the server
            LOGGER.exception("unexpected error in an association from %s", self.address[0])
            with contextlib.suppress(OSError):
                self.sock.sendall(encode_abort(0x00))


class _Handler(socketserver.BaseRequestHandler):
    server: StorageAcceptor

    def handle(self) -> None:
        self.server.handle_connection(self.request, self.client_address)


class StorageAcceptor(socketserver.ThreadingTCPServer):
    """Listens for associations; one thread per association.

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
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, ssl_context: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.policy = policy
        self.service = service
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None

    def active_count(self) -> int:
        """Connections currently open."""
        with self._lock:
            return len(self._open)

    def handle_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Run one association on the calling thread (socketserver's per-connection thread)."""
        with self._lock:
            self._open.add(sock)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = sock
            if self.ssl_context is not None:
                sock.settimeout(self.policy.acse_timeout or None)
                try:
                    conn = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    LOGGER.warning("TLS handshake with %s failed: %s", address[0], exc)
                    return
            Association(conn, (str(address[0]), int(address[1])), self.policy, self.service,
                        self.active_count).run()
            if conn is not sock:
                with contextlib.suppress(OSError, ssl.SSLError):
                    conn.close()
        finally:
            with self._lock:
                self._open.discard(sock)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="srnode-scp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close every open association."""
        self.shutdown()
        with self._lock:
            socks = list(self._open)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.server_close()
