"""The Storage SCP: association policy and C-ECHO / C-STORE handlers.

This is the network edge: typed errors from ``storage`` become DIMSE statuses here.  The
C-STORE fast path never decodes the pixel data: the encoded data set is taken as received
(``event.encoded_dataset()``), its header parsed, the file written atomically and fsynced, and
the index row committed, and only then is success returned.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationServer

from dicom_node import statuses
from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.validation import InvalidImageError, check_image, parse_dataset
from storage.db import Database
from storage.errors import (
    DatabaseUnavailableError,
    InvalidInstanceError,
    InvalidUIDError,
    StorageError,
)
from storage.filestore import FileStore
from storage.ingest import InstanceHeader, store_instance

LOGGER = logging.getLogger("srnode.scp")

#: Storage SOP classes srnode accepts; every other SOP class is refused at negotiation.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    MRImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
)

#: Transfer syntaxes accepted: uncompressed, deflate and every compressed syntax the installed
#: decoders (pylibjpeg, openjpeg, RLE, gdcm) can decode.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


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


class StorageSCP:
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
        self._server: AssociationServer | None = None
        node = config.node
        ae = _PolicyAE(node.ae_title, node.allowed_calling_ae_titles, node.allowed_hosts)
        ae.require_called_aet = node.require_called_ae_title
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.maximum_pdu_size = node.max_pdu_size
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        self.ae = ae

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start listening in background threads (returns at once)."""
        node = self.config.node
        ssl_context = None
        if node.tls.enabled:
            from dicom_node.tls import server_ssl_context

            ssl_context = server_ssl_context(node.tls)
        handlers = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ACCEPTED, self._handle_accepted),
        ]
        self._server = self.ae.start_server(
            (node.host, node.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        LOGGER.info(
            "SCP %s listening on %s:%d%s", node.ae_title, node.host, self.port,
            " (TLS)" if ssl_context else "",
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful when the configured port is 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers ----------------------------------------------------------------------------
    def _handle_conn_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform dependent
                pass

    def _handle_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        LOGGER.warning(
            "association rejected: calling AE %r from %s:%s, called AE %r "
            "(not in the allow-list, wrong host or called AE title, or too many associations)",
            req.ae_title, req.address, req.port, event.assoc.acceptor.ae_title,
        )
        self.audit.record(
            "association_rejected", calling_ae=req.ae_title, address=req.address,
            called_ae=getattr(req.primitive, "called_ae_title", None),
        )

    def _handle_accepted(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        LOGGER.info("association accepted: calling AE %r from %s", req.ae_title, req.address)
        rejected = [
            {"context_id": cx.context_id, "abstract_syntax": str(cx.abstract_syntax),
             "transfer_syntaxes": [str(ts) for ts in cx.transfer_syntax]}
            for cx in event.assoc.rejected_contexts
        ]
        if rejected:
            LOGGER.warning(
                "association from %r: %d presentation context(s) rejected (SOP class or "
                "transfer syntax not accepted): %s", req.ae_title, len(rejected),
                ", ".join(f"{r['abstract_syntax']} {'/'.join(r['transfer_syntaxes'])}"
                          for r in rejected),
            )
            self.audit.record("contexts_rejected", calling_ae=req.ae_title,
                              address=req.address, contexts=rejected)

    def _handle_echo(self, event: evt.Event) -> int:
        self.audit.record(
            "echo", calling_ae=event.assoc.requestor.ae_title, address=event.assoc.requestor.address
        )
        return statuses.SUCCESS

    def _refuse(self, calling_ae: str, address: str, status: int, reason: str,
                **uids: Any) -> int:
        LOGGER.warning(
            "C-STORE from %r refused with 0x%04X: %s %s", calling_ae, status, reason,
            " ".join(f"{k}={v}" for k, v in uids.items() if v),
        )
        self.audit.record(
            "instance_refused", calling_ae=calling_ae, address=address,
            status=f"0x{status:04X}", reason=reason, **uids,
        )
        return status

    def _handle_store(self, event: evt.Event) -> int | tuple[int, Any]:
        req = event.assoc.requestor
        affected = str(event.request.AffectedSOPInstanceUID or "")
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - network edge: never crash the association
            return self._refuse(req.ae_title, req.address, statuses.CANNOT_UNDERSTAND,
                                f"cannot read the data set ({type(exc).__name__})",
                                sop_instance_uid=affected)
        return self.receive(data, affected, str(event.context.abstract_syntax), req.ae_title,
                            req.address)

    def receive(self, data: bytes, affected_sop_instance_uid: str, sop_class_uid: str,
                calling_ae: str, address: str) -> int:
        """Check, store and index one received instance; return the C-STORE status.

        This is the whole per-instance receive path of the C-STORE handler, callable without a
        network (fuzzing).  It never raises: every problem becomes a failure status, a log line
        and an ``instance_refused`` audit entry.

        Parameters
        ----------
        data
            The encoded Part 10 file (file meta built from the presentation context).
        affected_sop_instance_uid
            Affected SOP Instance UID of the C-STORE request.
        sop_class_uid
            Abstract syntax of the presentation context used.
        calling_ae, address
            The peer (for the index, the log and the audit log).

        Returns
        -------
        int
            ``statuses.SUCCESS`` once the file is stored and indexed, else a failure status.
        """
        affected = affected_sop_instance_uid

        def refuse(status: int, reason: str, **uids: Any) -> int:
            return self._refuse(calling_ae, address, status, reason, **uids)

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
        try:
            ds = parse_dataset(data)
            header = InstanceHeader.from_dataset(ds)
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
                f"SOP Class UID {header.sop_class_uid} does not match the presentation context "
                f"{sop_class_uid}", **uids,
            )
        try:
            outcome = store_instance(self.db, self.store, header, data, calling_ae)
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
        return statuses.SUCCESS
