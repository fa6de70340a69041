"""What the acceptor needs from the node: the peer, the association policy and the service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pynetdicom.presentation import PresentationContext

from dicom_node.network import statuses
from dicom_node.network.pdu import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
)
from storage.spool import Spool


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

    def on_released(self, peer: Peer) -> None:
        """An accepted association ended (released, aborted or its connection lost).

        May be called more than once for one association.
        """

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
