"""The Storage SCP: association policy and C-ECHO / C-STORE handlers.

This is the network edge: typed errors from ``storage`` become DIMSE statuses here.  The
associations themselves run on :mod:`dicom_node.network.upper_layer` (one thread each).  The C-STORE
path never decodes the pixel data: the encoded data set is taken as received, its header parsed,
the file written atomically and fsynced while the index rows are prepared, the index committed,
and only then is success returned.
"""

from __future__ import annotations

import errno
import logging
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    Verification,
)

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.codes import ACCEPTED_TRANSFER_SYNTAXES, accepted_sop_classes
from dicom_node.config import Config
from dicom_node.log_safety import safe_ae, safe_text, safe_uid
from dicom_node.network import statuses
from dicom_node.network.acceptor import StorageAcceptor
from dicom_node.network.service import AcceptorPolicy, Peer, StorageService
from dicom_node.receive.header import header_from_dataset
from dicom_node.receive.header_scan import scan_instance
from dicom_node.receive.validation import InvalidImageError, check_image, parse_dataset
from storage.db import Database
from storage.errors import (
    DatabaseUnavailableError,
    InvalidInstanceError,
    InvalidUIDError,
    StorageError,
)
from storage.filestore import FileStore, PendingWrite
from storage.ingest import store_instance
from storage.spool import Spool

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.network.scp_pynetdicom import PynetdicomServer

LOGGER = logging.getLogger(__name__)

#: Rejected presentation contexts named in the WARNING line (the full list is logged at DEBUG).
REJECTED_CONTEXTS_LOGGED = 3


def _contexts_text(contexts: list[dict[str, Any]]) -> str:
    """``abstract syntax transfer/syntaxes`` of each presentation context, comma separated."""
    return ", ".join(f"{safe_uid(r['abstract_syntax'])} "
                     f"{'/'.join(safe_uid(ts) for ts in r['transfer_syntaxes'])}"
                     for r in contexts)


class StorageSCP(StorageService):
    """C-ECHO and C-STORE service class provider for CT and MR images.

    Parameters
    ----------
    config
        The node configuration (``[node]`` is used here).
    db
        The index database.
    store
        The file store.
    audit
        The audit log.
    """

    def __init__(self, config: Config, db: Database, store: FileStore, audit: AuditLog) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.audit = audit
        self._server: StorageAcceptor | PynetdicomServer | None = None
        # series received on each open association (the completeness check waits for them)
        self._receiving: dict[Peer, set[str]] = {}
        self._receiving_lock = threading.Lock()
        node = config.node
        contexts = [build_context(Verification)]
        contexts += [build_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
                     for sop_class in accepted_sop_classes(node.accept_all_storage)]
        self.policy = AcceptorPolicy(
            ae_title=node.ae_title,
            require_called_ae_title=node.require_called_ae_title,
            allowed_calling_ae_titles=list(node.allowed_calling_ae_titles),
            allowed_hosts={k: list(v) for k, v in node.allowed_hosts.items()},
            max_associations=node.max_associations,
            acse_timeout=node.acse_timeout,
            network_timeout=node.network_timeout,
            dimse_timeout=node.dimse_timeout,
            max_pdu_size=node.max_pdu_size,
            contexts=contexts,
            max_instance_bytes=node.max_instance_mb * 1024 * 1024,
            max_pending=node.max_pending_associations,
            max_pending_per_host=node.max_pending_per_host,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start listening in background threads (returns at once)."""
        node = self.config.node
        ssl_context = None
        if node.tls.enabled:
            from dicom_node.network.tls import server_ssl_context

            ssl_context = server_ssl_context(node.tls)
        if node.scp_engine == "pynetdicom":
            from dicom_node.network.scp_pynetdicom import PynetdicomServer

            self._server = PynetdicomServer((node.host, node.port), self.policy, self,
                                            ssl_context)
        else:
            acceptor = StorageAcceptor((node.host, node.port), self.policy, self, ssl_context)
            acceptor.start()
            self._server = acceptor
        LOGGER.info(
            "SCP %s listening on %s:%d%s (%s associations)", node.ae_title, node.host, self.port,
            " (TLS)" if ssl_context else "", node.scp_engine,
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful when the configured port is 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        """Whether the SCP has been started and not stopped (for /healthz)."""
        return self._server is not None

    def stop(self, grace: float | None = None) -> None:
        """Stop listening, let C-STOREs in flight finish, abort the other associations.

        Parameters
        ----------
        grace
            Seconds C-STOREs in flight may take (default ``[node] shutdown_grace_seconds``);
            the pynetdicom engine closes at once.
        """
        if self._server is not None:
            if isinstance(self._server, StorageAcceptor):
                self._server.stop(self.config.node.shutdown_grace_seconds
                                  if grace is None else grace)
            else:
                self._server.stop()
            self._server = None

    # -- StorageService ----------------------------------------------------------------------
    def on_rejected(self, peer: Peer, reason: str) -> None:
        """Log and audit a rejected association request."""
        LOGGER.warning(
            "association rejected: calling AE %r from %s:%s, called AE %r (%s)",
            safe_ae(peer.ae_title), peer.address, peer.port, safe_ae(peer.called_ae_title),
            reason,
        )
        metrics.ASSOCIATIONS_REJECTED.labels(reason=metrics.reject_reason_label(reason)).inc()
        self.audit.record(
            "association_rejected", calling_ae=peer.ae_title, address=peer.address,
            called_ae=peer.called_ae_title, reason=reason,
        )

    def on_accepted(self, peer: Peer, rejected: list[PresentationContext]) -> None:
        """Log an accepted association and audit the presentation contexts it was refused."""
        LOGGER.info("association accepted: calling AE %r from %s", safe_ae(peer.ae_title),
                    peer.address)
        refused = [
            {"context_id": cx.context_id, "abstract_syntax": str(cx.abstract_syntax),
             "transfer_syntaxes": [str(ts) for ts in cx.transfer_syntax]}
            for cx in rejected
        ]
        if refused:
            LOGGER.warning(
                "association from %r: %d presentation context(s) rejected (SOP class or "
                "transfer syntax not accepted), first %d: %s", safe_ae(peer.ae_title),
                len(refused), min(len(refused), REJECTED_CONTEXTS_LOGGED),
                _contexts_text(refused[:REJECTED_CONTEXTS_LOGGED]),
            )
            LOGGER.debug("association from %r: every rejected presentation context: %s",
                         safe_ae(peer.ae_title), _contexts_text(refused))
            self.audit.record("contexts_rejected", calling_ae=peer.ae_title,
                              address=peer.address, contexts=refused)

    def on_negotiation_failed(self, address: str, reason: str, peer: Peer | None) -> None:
        """Log and audit a connection that ended (or was closed) before an association."""
        LOGGER.warning("negotiation with %s%s failed: %s", address,
                       f" (calling AE {safe_ae(peer.ae_title)!r})" if peer else "",
                       safe_text(reason, limit=256))
        self.audit.record("negotiation_failed", address=address,
                          calling_ae=peer.ae_title if peer else "", reason=reason)

    def on_store_refused(self, peer: Peer, status: int, reason: str,
                         affected_sop_instance_uid: str) -> int:
        """Log and audit a C-STORE the acceptor refused itself (malformed command, too large)."""
        return self._refuse(peer.ae_title, peer.address, status, reason,
                            sop_instance_uid=affected_sop_instance_uid)

    def on_echo(self, peer: Peer) -> int:
        """Answer a C-ECHO (and audit it)."""
        self.audit.record("echo", calling_ae=peer.ae_title, address=peer.address)
        return statuses.SUCCESS

    def on_released(self, peer: Peer) -> None:
        """Forget the series of an association that ended (their quiet period starts)."""
        with self._receiving_lock:
            self._receiving.pop(peer, None)

    def receiving_series(self) -> frozenset[str]:
        """Series Instance UIDs with instances received on associations still open."""
        with self._receiving_lock:
            return frozenset().union(*self._receiving.values())

    def _note_receiving(self, peer: Peer | None, series_instance_uid: str) -> None:
        if peer is not None:
            with self._receiving_lock:
                self._receiving.setdefault(peer, set()).add(series_instance_uid)

    def on_store(self, data: bytes | Spool, affected_sop_instance_uid: str,
                 sop_class_uid: str, peer: Peer) -> int:
        """Store one received instance (see :meth:`receive`)."""
        try:
            return self.receive(data, affected_sop_instance_uid, sop_class_uid, peer.ae_title,
                                peer.address, peer=peer)
        finally:
            if isinstance(data, Spool):
                data.discard()  # no-op once handed over as the pending write

    def open_spool(self) -> Spool | None:
        """Return an empty spool file in the store for a large data set being received.

        Raises
        ------
        OSError
            The disk is below ``min_free_disk_mb`` (ENOSPC) or the file cannot be written.
        """
        if self.store.free_bytes() < self.config.node.min_free_disk_mb * 1024 * 1024:
            raise OSError(errno.ENOSPC, "free disk below min_free_disk_mb")
        return Spool(self.store)

    def _refuse(self, calling_ae: str, address: str, status: int, reason: str,
                **uids: Any) -> int:
        LOGGER.warning(
            "C-STORE from %r refused with 0x%04X: %s %s", safe_ae(calling_ae), status,
            safe_text(reason, limit=256),
            " ".join(f"{k}={safe_uid(v)}" for k, v in uids.items() if v),
        )
        self.audit.record(
            "instance_refused", calling_ae=calling_ae, address=address,
            status=f"0x{status:04X}", reason=reason, **uids,
        )
        metrics.INSTANCES_REFUSED.labels(status=f"0x{status:04X}").inc()
        return status

    def receive(self, data: bytes | bytearray | Spool, affected_sop_instance_uid: str,
                sop_class_uid: str, calling_ae: str, address: str,
                peer: Peer | None = None) -> int:
        """Check, store and index one received instance; return the C-STORE status.

        This is the whole per-instance receive path of the C-STORE handler, callable without a
        network (fuzzing).  It never raises: every problem becomes a failure status, a log line
        and an ``instance_refused`` audit entry.

        Parameters
        ----------
        data
            The encoded Part 10 file (file meta built from the presentation context), in
            memory or spooled to a file as it arrived (the caller discards the spool).
        affected_sop_instance_uid
            Affected SOP Instance UID of the C-STORE request.
        sop_class_uid
            Abstract syntax of the presentation context used.
        calling_ae, address
            The peer (for the index, the log and the audit log).
        peer
            The association's requestor: its series count as still arriving until
            :meth:`on_released` (``None``: no association, e.g. fuzzing).

        Returns
        -------
        int
            ``statuses.SUCCESS`` once the file is stored and indexed, else a failure status.
        """
        affected = affected_sop_instance_uid
        refuse = partial(self._refuse, calling_ae, address)

        floor = self.config.node.min_free_disk_mb * 1024 * 1024
        try:
            free = self.store.free_bytes()
        except OSError as exc:
            return refuse(statuses.OUT_OF_RESOURCES, f"cannot stat storage: {exc}")
        if free < floor:
            return refuse(
                statuses.OUT_OF_RESOURCES,
                f"free disk {free // (1024 * 1024)} MB below floor "
                f"{self.config.node.min_free_disk_mb} MB",
                sop_instance_uid=affected,
            )
        # Start writing and fsyncing the bytes now; parsing and indexing overlap with the disk.
        try:
            if isinstance(data, Spool):  # already on disk: mapped for the checks, then renamed
                view = data.view()
                pending = data.to_pending()
                data = view  # type: ignore[assignment]
            else:
                pending = self.store.begin_write(data)
        except OSError as exc:
            return refuse(statuses.OUT_OF_RESOURCES,
                          f"cannot write file: {exc.strerror or exc}", sop_instance_uid=affected)
        except Exception as exc:  # noqa: BLE001 - network edge: never crash the association
            return refuse(statuses.PROCESSING_FAILURE, f"cannot write file: {exc}",
                          sop_instance_uid=affected)
        try:
            return self._check_and_store(pending, data, affected, sop_class_uid, calling_ae,
                                         address, peer)
        finally:
            pending.discard()  # no-op once stored

    def _check_and_store(self, pending: PendingWrite, data: bytes, affected: str,
                         sop_class_uid: str, calling_ae: str, address: str,
                         peer: Peer | None = None) -> int:
        refuse = partial(self._refuse, calling_ae, address)

        # Clean, common instances are vouched for by a single fast scan; anything else (and
        # every refusal, with its reason) goes through pydicom.
        header = scan_instance(data)
        try:
            if header is None:
                ds = parse_dataset(data)
                header = header_from_dataset(ds)
                if header.enhanceable:  # other SOP classes are stored as they are
                    check_image(ds)
        except InvalidImageError as exc:
            return refuse(statuses.INVALID_IMAGE, str(exc), sop_instance_uid=affected)
        except InvalidUIDError as exc:
            return refuse(statuses.INVALID_UID, str(exc), sop_instance_uid=affected)
        except InvalidInstanceError as exc:
            return refuse(statuses.CANNOT_UNDERSTAND, str(exc), sop_instance_uid=affected)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the sender's data
            return refuse(statuses.CANNOT_UNDERSTAND,
                          f"cannot parse data set ({type(exc).__name__})",
                          sop_instance_uid=affected)
        uids = {
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "sop_instance_uid": header.sop_instance_uid,
        }
        if header.sop_instance_uid != affected:
            return refuse(
                statuses.INVALID_UID,
                "SOP Instance UID in the data set differs from Affected SOP Instance UID", **uids,
            )
        if header.sop_class_uid != sop_class_uid:
            return refuse(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class UID {safe_uid(header.sop_class_uid)} does not match the presentation "
                f"context {safe_uid(sop_class_uid)}", **uids,
            )
        if not header.enhanceable and self.config.node.other_sop_classes == "discard":
            self.audit.record("instance_discarded", calling_ae=calling_ae, address=address,
                              sop_class_uid=header.sop_class_uid, **uids)
            return statuses.SUCCESS
        self._note_receiving(peer, header.series_instance_uid)
        try:
            outcome = store_instance(self.db, self.store, header, pending, calling_ae)
        except DatabaseUnavailableError as exc:
            return refuse(statuses.OUT_OF_RESOURCES_INDEX,
                          f"index database unavailable: {exc}", **uids)
        except OSError as exc:
            return refuse(statuses.OUT_OF_RESOURCES,
                          f"cannot write file: {exc.strerror or exc}", **uids)
        except StorageError as exc:
            return refuse(statuses.PROCESSING_FAILURE, str(exc), **uids)
        except Exception as exc:  # noqa: BLE001 - network edge: never crash the association
            LOGGER.exception("unexpected error storing an instance")
            return refuse(statuses.PROCESSING_FAILURE,
                          f"unexpected error: {type(exc).__name__}", **uids)
        self.audit.record(
            "instance_received", calling_ae=calling_ae, address=address,
            sop_class_uid=header.sop_class_uid, transfer_syntax_uid=header.transfer_syntax_uid,
            modality=header.modality, replaced=outcome.replaced, **uids,
        )
        LOGGER.debug("stored %s (replaced=%s)", header.sop_instance_uid, outcome.replaced)
        metrics.INSTANCES_RECEIVED.inc()
        return statuses.SUCCESS
