"""The pynetdicom association engine: ``[node] scp_engine = "pynetdicom"``.

srnode receives on its own upper-layer acceptor (:mod:`dicom_node.network.upper_layer`) by default.
This engine runs the same policy and the same per-instance receive path on pynetdicom's
association machinery instead: slower (about 2x per instance on a 2-core machine), but a
fallback a PACS administrator can switch to if a sender ever disagrees with srnode's acceptor.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer

from dicom_node.network.pdu import REJECT_CALLED_AE
from dicom_node.network.service import AcceptorPolicy, Peer, StorageService

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.presentation import PresentationContext


class _PolicyAE(AE):
    """An AE whose calling-AE allow-list depends on the peer's address.

    pynetdicom reads ``require_calling_aet`` inside the association thread while negotiating, so
    answering per peer here turns a host mismatch into a proper A-ASSOCIATE-RJ (calling AE title
    not recognised) instead of an abort after acceptance.
    """

    def __init__(self, ae_title: str, allowed: Sequence[str], hosts: dict[str, list[str]]) -> None:
        super().__init__(ae_title=ae_title)
        self._allowed = [a.strip() for a in allowed]
        self._hosts = {k.strip(): list(v) for k, v in hosts.items()}

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        """Calling AE titles allowed for the peer of the current association."""
        if not self._allowed and not self._hosts:
            return []
        candidates = self._allowed or list(self._hosts)
        thread = threading.current_thread()
        if not isinstance(thread, Association):
            return candidates
        address = thread.requestor.address
        allowed = [a for a in candidates if a not in self._hosts or address in self._hosts[a]]
        # An empty list would mean "anyone": use a title no peer can send instead.
        return allowed or ["\\"]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        self._allowed = [a.strip() for a in ae_titles]


def _peer(assoc: Association) -> Peer:
    req = assoc.requestor
    called = getattr(req.primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    return Peer(str(req.ae_title).strip(), str(req.address), int(req.port or 0),
                str(called).strip())


class PynetdicomServer:
    """Serve the :class:`StorageService` on pynetdicom's association machinery.

    Parameters
    ----------
    address
        ``(host, port)`` to bind.
    policy
        The same association policy the default acceptor applies.
    service
        Receives C-ECHO and C-STORE requests.
    ssl_context
        Server-side TLS context (``None``: plain TCP).
    """

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.service = service
        ae = _PolicyAE(policy.ae_title, policy.allowed_calling_ae_titles, policy.allowed_hosts)
        ae.require_called_aet = policy.require_called_ae_title
        ae.maximum_associations = policy.max_associations
        ae.acse_timeout = policy.acse_timeout
        ae.dimse_timeout = policy.dimse_timeout
        ae.network_timeout = policy.network_timeout
        ae.maximum_pdu_size = policy.max_pdu_size
        for cx in policy.contexts:
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        self.ae = ae
        handlers = [
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_CONN_OPEN, self._conn_open),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_ABORTED, self._released),
            (evt.EVT_CONN_CLOSE, self._released),
        ]
        self._server: AssociationServer = ae.start_server(
            address, block=False, evt_handlers=handlers, ssl_context=ssl_context)
        self.server_address = self._server.server_address

    def stop(self) -> None:
        """Stop listening and close open associations."""
        self._server.shutdown()

    def _conn_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform dependent
                pass

    def _rejected(self, event: evt.Event) -> None:
        peer = _peer(event.assoc)
        reason = "calling AE title not allowed (or not from its host), or too many associations"
        if self.policy.check_requestor(peer.ae_title, peer.called_ae_title,
                                       peer.address) == REJECT_CALLED_AE:
            reason = "called AE title is not this node's"
        self.service.on_rejected(peer, reason)

    def _accepted(self, event: evt.Event) -> None:
        rejected: list[PresentationContext] = list(event.assoc.rejected_contexts)
        self.service.on_accepted(_peer(event.assoc), rejected)

    def _released(self, event: evt.Event) -> None:
        self.service.on_released(_peer(event.assoc))

    def _echo(self, event: evt.Event) -> int:
        return self.service.on_echo(_peer(event.assoc))

    def _store(self, event: evt.Event) -> int:
        peer = _peer(event.assoc)
        affected = str(event.request.AffectedSOPInstanceUID or "")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - network edge: the service refuses what it can't read
            data = b""
        return self.service.on_store(data, affected, str(event.context.abstract_syntax), peer)
