"""C-ECHO and C-STORE service class user: sends instances to a configured destination.

One association per :func:`send_instances` call, proposing only the presentation contexts the
instances need.  When the destination does not accept an instance's (compressed) transfer syntax
the instance is decompressed to Explicit VR Little Endian before it is sent; the SOP Instance UID is
kept because the change of transfer syntax is lossless.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from dicom_node.config import Destination, TLSConfig
from dicom_node.network import statuses
from dicom_node.network.tls import client_ssl_context

__all__ = [
    "MAX_PDU_SIZE",
    "DestinationUnavailableError",
    "SendError",
    "SendReport",
    "configure_pynetdicom",
    "echo",
    "send_instances",
]

LOGGER = logging.getLogger(__name__)

#: Largest P-DATA PDU this SCU announces it can receive (bytes).
MAX_PDU_SIZE = 4 * 1024 * 1024
#: Most presentation contexts one association may propose (odd IDs 1..255).
_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DestinationUnavailableError(RuntimeError):
    """No usable association with the destination (refused, rejected, aborted or timed out).

    Attributes
    ----------
    reason
        Human readable reason (A-ASSOCIATE-RJ result/source/reason, socket or TLS error).
    report
        What was sent before the association was lost (``None`` when nothing was attempted).
    """

    def __init__(self, reason: str, report: SendReport | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report


class SendError(RuntimeError):
    """The instances could not be sent for a reason other than the destination being down.

    Attributes
    ----------
    report
        What was sent before the error (``None`` when nothing was attempted).
    """

    def __init__(self, message: str, report: SendReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class SendReport:
    """Outcome of one :func:`send_instances` call.

    Attributes
    ----------
    sent
        SOP Instance UIDs stored by the destination (success or warning status), in send order.
    skipped
        SOP Instance UIDs not sent because they were in ``skip_sop_instance_uids``.
    failed
        SOP Instance UID -> failure status (from the destination, or
        ``statuses.SOP_CLASS_NOT_SUPPORTED`` when no presentation context fitted).
    warnings
        SOP Instance UID -> warning status, for stored instances with a warning.
    errors
        SOP Instance UID -> human readable reason, for local failures.
    decompressed
        SOP Instance UIDs that were decompressed before sending.
    """

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    decompressed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """``True`` when no instance failed."""
        return not self.failed


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID
    streamable: bool  # file meta names SOP class/instance: pynetdicom can send it from disk


class _PeerLogCapture(logging.Handler):
    """Collect pynetdicom's error messages so a failed association can report why."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[tuple[int | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.thread, record.getMessage()))

    def messages(self, thread_ids: Collection[int | None]) -> list[str]:
        return [msg for tid, msg in self.records if tid in thread_ids]


@contextmanager
def _capture_pynetdicom_errors() -> Iterator[_PeerLogCapture]:
    handler = _PeerLogCapture()
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def configure_pynetdicom() -> None:
    """Set the process-wide pynetdicom options srnode relies on (once, at process start-up).

    Files whose transfer syntax the destination accepted are handed to ``send_c_store`` as
    paths and are then streamed from disk as they are (no decode/re-encode: about 3x faster);
    :func:`_prepare` only passes a path in that case.  Without this call pynetdicom reads such a
    file whole before sending it (same result, slower).
    """
    _pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


def _make_ae(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = MAX_PDU_SIZE
    return ae


def _failure_reason(assoc: Association, capture: _PeerLogCapture, where: str) -> str:
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None:
            return (
                f"association rejected by {where}: {rj.result_str}, source {rj.source_str}, "
                f"reason {rj.reason_str}"
            )
        return f"association rejected by {where}"
    # negotiation runs in the calling thread, the transport in the DUL thread
    threads = {threading.get_ident(), assoc.ident, getattr(assoc.dul, "ident", None)}
    messages = capture.messages(threads)
    details = [m for m in messages if "Error" in m] or messages
    if details:
        return f"cannot associate with {where}: " + "; ".join(dict.fromkeys(details))
    if assoc.is_aborted:
        return f"association aborted by {where}"
    return f"cannot associate with {where}: no answer (timeout or connection refused)"


def _associate(
    ae: AE,
    host: str,
    port: int,
    called_ae_title: str,
    tls: TLSConfig | None,
    contexts: list[PresentationContext],
) -> Association:
    where = f"{called_ae_title}@{host}:{port}"
    tls_args = None
    if tls is not None and tls.enabled:
        try:
            tls_args = (client_ssl_context(tls), host)
        except ValueError as exc:  # TLSFileError: a configuration problem, not the peer's
            raise SendError(f"TLS settings for {where}: {exc}") from exc
    with _capture_pynetdicom_errors() as capture:
        try:
            assoc = ae.associate(
                host,
                port,
                contexts=contexts,
                ae_title=called_ae_title,
                max_pdu=MAX_PDU_SIZE,
                tls_args=tls_args,
            )
        except OSError as exc:  # e.g. the host name does not resolve
            raise DestinationUnavailableError(f"cannot associate with {where}: {exc}") from exc
    if not assoc.is_established:
        raise DestinationUnavailableError(_failure_reason(assoc, capture, where))
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return assoc


def echo(
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str = "SRNODE",
    tls: TLSConfig | None = None,
    timeout: float = 10,
) -> int:
    """Send a C-ECHO (Verification) request.

    Parameters
    ----------
    ae_title
        Called AE title of the peer.
    host, port
        Network address of the peer.
    calling_ae_title
        Our AE title.
    tls
        TLS settings for the association; ``None`` or disabled means plain TCP.
    timeout
        Seconds allowed for connecting, association negotiation and the response.

    Returns
    -------
    int
        The C-ECHO response status (``0x0000`` is success).

    Raises
    ------
    DestinationUnavailableError
        No association could be established, the peer does not accept Verification, or the
        association was lost before the response.
    SendError
        ``tls`` names certificate/key/CA files that are missing or unreadable.
    """
    ae = _make_ae(calling_ae_title, timeout)
    contexts = [build_context(Verification, list(_UNCOMPRESSED))]
    assoc = _associate(ae, host, port, ae_title, tls, contexts)
    try:
        with _reactor_parked(assoc):
            status = assoc.send_c_echo()
    except ValueError as exc:  # the Verification context was not accepted
        raise DestinationUnavailableError(
            f"{ae_title}@{host}:{port} does not accept Verification (C-ECHO): {exc}"
        ) from exc
    finally:
        _close(assoc)
    if "Status" not in status:
        raise DestinationUnavailableError(
            f"no C-ECHO response from {ae_title}@{host}:{port} (timeout or abort)"
        )
    return int(status.Status)


class _HeldCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint, kept cleared while srnode sends on the association.

    pynetdicom pauses an association's reactor thread for each ``send_*`` call by clearing this
    event and waiting until the reactor says it is paused, and sets it again afterwards.  The
    reactor announces "paused" just before it waits on the event and withdraws it just after;
    a send that reads the announcement in between goes ahead while the reactor is about to poll
    the DIMSE queue, and the reactor then takes the peer's C-STORE response as an unexpected
    message ("Received unexpected C-STORE service message"; the send then waits out the DIMSE
    timeout and the job is retried).  On a loaded machine this happens a few times a day.
    Holding the event cleared for the whole send keeps the reactor parked at the event, so it
    never polls between two of srnode's messages.  :meth:`set` is ignored while ``held``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held = True

    def set(self) -> None:
        """Set the event, unless it is held."""
        if not self.held:
            super().set()


@contextmanager
def _reactor_parked(assoc: Association, timeout: float = 5.0) -> Iterator[None]:
    """Keep the association's reactor thread parked while the block sends and receives.

    Until the reactor parks, at most one pass of its loop runs; before the first request
    nothing is outstanding, so that pass cannot take a response.  Where pynetdicom's private
    attributes are not there (another pynetdicom release) the block runs unchanged.
    """
    if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event) or not (
        hasattr(assoc, "_is_paused")
    ):
        yield
        return
    checkpoint = _HeldCheckpoint()
    assoc._reactor_checkpoint = checkpoint
    deadline = time.monotonic() + timeout
    while not assoc._is_paused and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)
    try:
        yield
    finally:
        checkpoint.held = False
        if not assoc.is_established:
            checkpoint.set()  # let the reactor see the end of the association and exit
        # else: release()/abort() pause and set the checkpoint themselves


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    if assoc.is_established:
        assoc.abort()


def _read_instances(paths: Sequence[Path]) -> list[_Instance]:
    instances = []
    for path in paths:
        try:
            ds = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["SOPClassUID", "SOPInstanceUID"],
            )
        except (OSError, InvalidDicomError) as exc:
            raise SendError(f"cannot read DICOM file {path}: {exc}") from exc
        meta = ds.file_meta
        sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        sop_instance = meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID")
        syntax = meta.get("TransferSyntaxUID")
        if not (sop_class and sop_instance and syntax):
            raise SendError(
                f"{path}: file meta lacks SOP Class UID, SOP Instance UID or Transfer Syntax UID"
            )
        streamable = "MediaStorageSOPClassUID" in meta and "MediaStorageSOPInstanceUID" in meta
        instances.append(
            _Instance(Path(path), UID(sop_class), str(sop_instance), UID(syntax), streamable)
        )
    return instances


def _contexts_for(instances: Sequence[_Instance]) -> list[PresentationContext]:
    """One context per SOP class with both uncompressed VRs, plus one per other syntax used."""
    by_class: dict[UID, list[UID]] = {}
    for inst in instances:
        syntaxes = by_class.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax_uid not in syntaxes:
            syntaxes.append(inst.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in by_class.items():
        uncompressed = [ts for ts in syntaxes if ts in _UNCOMPRESSED]
        uncompressed += [ts for ts in _UNCOMPRESSED if ts not in uncompressed]
        contexts.append(build_context(sop_class, uncompressed))
        for ts in syntaxes:
            if ts not in _UNCOMPRESSED:
                contexts.append(build_context(sop_class, [ts]))
    if len(contexts) > _MAX_CONTEXTS:
        raise SendError(
            f"{len(contexts)} presentation contexts needed, at most {_MAX_CONTEXTS} fit in one "
            "association; send fewer SOP classes / transfer syntaxes per call"
        )
    return contexts


def _accepted_syntaxes(assoc: Association, sop_class: UID) -> set[UID]:
    return {
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    }


def _prepare(inst: _Instance, accepted: set[UID]) -> tuple[Path | Dataset, bool]:
    """Return what to hand to pynetdicom, and whether it was decompressed.

    The file path itself when the destination accepted the file's transfer syntax (pynetdicom
    then streams the encoded data set from disk), otherwise the data set read into memory,
    decompressed or inflated when needed (pynetdicom converts between uncompressed syntaxes).

    Raises
    ------
    LookupError
        No accepted context can carry the instance.
    ValueError
        Decompression failed.
    """
    ts = inst.transfer_syntax_uid
    if ts in accepted and inst.streamable:
        return inst.path, False
    if ts not in accepted and not accepted & set(_UNCOMPRESSED):
        raise LookupError(
            f"destination accepted no presentation context for SOP class {inst.sop_class_uid} "
            f"({inst.sop_class_uid.name}) with {ts.name} or an uncompressed syntax"
        )
    ds = dcmread(inst.path)
    if ts in accepted or not (ts.is_compressed or ts.is_deflated):
        return ds, False
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # decoders raise assorted exception types
            raise ValueError(f"cannot decompress {ts.name}: {exc}") from exc
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, True


def _send_each(assoc: Association, todo: Sequence[_Instance], report: SendReport, where: str,
               on_stored: Callable[[str], None] | None) -> None:
    """C-STORE each instance on ``assoc``, recording the outcome in ``report``.

    Raises
    ------
    DestinationUnavailableError
        No C-STORE response came (association aborted or timed out).
    """
    for inst in todo:
        uid = inst.sop_instance_uid
        accepted = _accepted_syntaxes(assoc, inst.sop_class_uid)
        try:
            payload, decompressed = _prepare(inst, accepted)
        except (LookupError, ValueError) as exc:
            report.failed[uid] = statuses.SOP_CLASS_NOT_SUPPORTED
            report.errors[uid] = str(exc)
            LOGGER.warning("not sending SOP Instance %s to %s: %s", uid, where, exc)
            continue
        if decompressed:
            report.decompressed.append(uid)
        try:
            rsp = assoc.send_c_store(payload)
        except (ValueError, AttributeError) as exc:  # no context / cannot encode
            report.failed[uid] = statuses.SOP_CLASS_NOT_SUPPORTED
            report.errors[uid] = str(exc)
            LOGGER.warning("not sending SOP Instance %s to %s: %s", uid, where, exc)
            continue
        if "Status" not in rsp:
            raise DestinationUnavailableError(
                f"no C-STORE response from {where} for SOP Instance {uid} "
                "(association aborted or timed out)",
                report,
            )
        status = int(rsp.Status)
        if status == statuses.SUCCESS or status in statuses.STORE_WARNINGS:
            report.sent.append(uid)
            if status != statuses.SUCCESS:
                report.warnings[uid] = status
            if on_stored is not None:
                on_stored(uid)
        else:
            report.failed[uid] = status
            LOGGER.warning(
                "%s refused SOP Instance %s with status 0x%04X", where, uid, status
            )


def send_instances(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    skip_sop_instance_uids: Collection[str] = (),
    on_stored: Callable[[str], None] | None = None,
    timeout: float = 60,
) -> SendReport:
    """Send DICOM files to a destination with C-STORE over one association.

    Parameters
    ----------
    destination
        The peer (AE title, host, port, TLS settings).
    paths
        DICOM Part 10 files to send.
    calling_ae_title
        Our AE title.
    skip_sop_instance_uids
        SOP Instance UIDs already stored by the destination (resuming a partial send).
    on_stored
        Called with the SOP Instance UID right after each instance the destination stored
        (success or warning status).
    timeout
        Seconds allowed for connecting, association negotiation and each C-STORE response.

    Returns
    -------
    SendReport
        Per-instance outcome.  Failure statuses of the destination are recorded, not raised.

    Raises
    ------
    DestinationUnavailableError
        The association was refused, rejected, aborted or timed out.  ``report`` holds what was
        stored before the association was lost.
    SendError
        A file cannot be read, the instances need more presentation contexts than fit, or the
        destination's TLS files are missing or unreadable.
    """
    report = SendReport()
    skip = set(skip_sop_instance_uids)
    todo = []
    for inst in _read_instances(paths):
        if inst.sop_instance_uid in skip:
            report.skipped.append(inst.sop_instance_uid)
        else:
            todo.append(inst)
    if not todo:
        return report

    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    ae = _make_ae(calling_ae_title, timeout)
    assoc = _associate(
        ae,
        destination.host,
        destination.port,
        destination.ae_title,
        destination.tls,
        _contexts_for(todo),
    )
    try:
        with _reactor_parked(assoc):
            _send_each(assoc, todo, report, where, on_stored)
    finally:
        _close(assoc)
    LOGGER.info(
        "sent %d, skipped %d, failed %d instance(s) to %s",
        len(report.sent),
        len(report.skipped),
        len(report.failed),
        where,
    )
    return report

