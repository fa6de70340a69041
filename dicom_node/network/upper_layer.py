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
import ssl
import struct
import threading
import time
from collections.abc import Callable

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

from dicom_node.codes import IMPLEMENTATION_CLASS_UID
from dicom_node.log_safety import is_valid_ae_title, is_valid_uid, safe_ae
from dicom_node.network import statuses
from dicom_node.network.dataset_buffer import DataSetBuffer
from dicom_node.network.pdu import (
    A_ABORT_PDU,
    A_ASSOCIATE_RQ_PDU,
    A_RELEASE_RQ_PDU,
    ABORT_INVALID_PARAMETER,
    APPLICATION_CONTEXT_NAME,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    IMPLEMENTATION_VERSION_NAME,
    MAX_ASSOCIATE_RQ,
    MAX_COMMAND_SET,
    MAX_UNLIMITED_PDU,
    NO_DATA_SET,
    P_DATA_TF_PDU,
    REJECT_APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_PROTOCOL_VERSION,
    RELEASE_RP,
    SPOOL_THRESHOLD,
    VERIFICATION_SOP_CLASS,
    AssociationAbortedError,
    decode_command,
    encode_abort,
    encode_pdu,
    encode_response,
    file_meta,
    read_pdu,
    read_request_pdu,
    read_ui,
    read_us,
    read_us_or_none,
)
from dicom_node.network.service import AcceptorPolicy, Peer, StorageService

LOGGER = logging.getLogger(__name__)
#: ARTIM timer after a rejection: how long the requestor has to close the connection.
ARTIM_SECONDS = 2.0


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
        """Tell the service (log, audit), then send an A-ASSOCIATE-RJ.

        The rejection is recorded before the requestor learns of it, so the audit log holds the
        rejections of one requestor in the order it received them.
        """
        assert self.peer is not None
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = reject
        rj = A_ASSOCIATE_RJ()
        rj.from_primitive(primitive)
        self.service.on_rejected(self.peer, reason)
        self.sock.sendall(rj.encode())
        self._await_requestor_close()

    def _await_requestor_close(self) -> None:
        """After an A-ASSOCIATE-RJ, let the requestor close the connection (PS3.8 Sta13).

        Closing first can reset the connection before the requestor has read the rejection
        (it then sees a dropped connection instead of the reason).  The wait is bounded by the
        ARTIM timer; a peer that keeps the connection open is closed after it.
        """
        try:
            self.sock.settimeout(ARTIM_SECONDS)
            while self.sock.recv(4096):
                pass
        except (OSError, ssl.SSLError):
            pass

    # -- data transfer ------------------------------------------------------------------------
    def _send_command(self, context_id: int, command: bytes) -> None:
        limit = self.peer_max_length - 6 if self.peer_max_length > 6 else len(command)
        chunks = [command[i:i + limit] for i in range(0, len(command), limit)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            control = 0x03 if i == len(chunks) - 1 else 0x01
            item = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
            out.append(encode_pdu(P_DATA_TF_PDU, item))
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
                        if read_us(fields, 0x0800) == NO_DATA_SET:
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
        sop_instance = read_ui(fields, 0x1000)
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
        command_field = read_us(fields, 0x0100)
        if command_field == C_CANCEL_RQ:
            return
        context = self.contexts[context_id]
        abstract = str(context.abstract_syntax)
        assert self.peer is not None
        message_id = read_us_or_none(fields, 0x0110)
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
            sop_class = read_ui(fields, 0x0002)
            sop_class = sop_class if is_valid_uid(sop_class) else abstract
            sop_instance = read_ui(fields, 0x1000)
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
            if self.peer is not None:
                try:
                    self.service.on_released(self.peer)
                except Exception:  # noqa: BLE001 - the association is over either way
                    LOGGER.exception("association end handler failed")

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
