"""Receive-path hardening (issue 13), with real loopback sockets and a real ``srnode serve``.

Memory is measured from ``/proc/<pid>/status`` of the node process (what the OS charges it),
never from inside Python.  Attackers connect from other loopback addresses (127.0.0.2, ...), as
they would from other hosts, so the per-address budget applies to them and not to the sender.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicom_node.network import statuses
from dicom_node.network.acceptor import StorageAcceptor
from dicom_node.network.pdu import decode_command, encode_command
from dicom_node.network.service import AcceptorPolicy, Peer, StorageService
from storage.models import Instance
from storage.spool import Spool
from tests.dicom_factory import make_ct_series
from tests.support.certs import make_pki
from tests.support.faults import ServedNode, indexed_instances, storage_problems
from tests.support.node import node_config, running_node
from tests.support.raw_dicom import associate_rq, read_pdu

PATIENT_NAME = "DOE^JOHN"
PATIENT_ID = "PID4711"
FORGED = "\nCRITICAL srnode.scp: FORGED LINE "
CT_EXPLICIT = "1.2.840.10008.1.2.1"


# -- raw DICOM helpers ---------------------------------------------------------------------
def _connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def _raw_association(port: int, rq: bytes | None = None) -> socket.socket:
    sock = _connect(port)
    sock.sendall(rq or associate_rq())
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, pdu_type
    return sock


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    item = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _ui(value: str) -> bytes:
    raw = value.encode("latin-1")
    return raw + b"\0" if len(raw) % 2 else raw


def _store_rq(affected: str, message_id: int = 1,
              sop_class: str = str(CTImageStorage)) -> bytes:
    return encode_command([
        (0x0002, _ui(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)), (0x1000, _ui(affected)),
    ])


def _echo_rq(message_id: int = 99) -> bytes:
    return encode_command([
        (0x0002, _ui(str(Verification))), (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)),
    ])


def _response_status(sock: socket.socket) -> int | None:
    """Read one response command set (possibly fragmented); ``None`` on A-ABORT or close."""
    fragments = b""
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            return None
        offset = 0
        while offset < len(body):
            length, _, control = struct.unpack_from(">IBB", body, offset)
            fragments += body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 0x02:
                return int(struct.unpack("<H", decode_command(fragments)[0x0900])[0])


def _send_store(sock: socket.socket, affected: str, dataset: bytes, message_id: int = 1,
                sop_class: str = str(CTImageStorage)) -> int | None:
    command = _store_rq(affected, message_id, sop_class)
    step = 16000  # fragments fit any negotiated maximum PDU length used here
    for start in range(0, len(command), step):
        last = start + step >= len(command)
        sock.sendall(_p_data(3, 0x03 if last else 0x01, command[start:start + step]))
    for start in range(0, max(len(dataset), 1), 60000):
        last = start + 60000 >= len(dataset)
        sock.sendall(_p_data(3, 0x02 if last else 0x00, dataset[start:start + 60000]))
    return _response_status(sock)


def _dataset(path: Path, **changes: str) -> bytes:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    data = encode(ds, False, True)
    assert data is not None
    return bytes(data)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


class _RssSampler(threading.Thread):
    """Samples a process's RSS every 20 ms until stopped; ``peak`` in kB."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = _rss_kb(pid)
        self.peak_threads = _threads(pid)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.02):
            self.peak = max(self.peak, _rss_kb(self.pid))
            self.peak_threads = max(self.peak_threads, _threads(self.pid))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _audit(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def ct(tmp_path: Path) -> list[Path]:
    return make_ct_series(tmp_path / "ct", n_slices=12, rows=16)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedNode]:
    node = ServedNode(tmp_path, node={"log_level": "DEBUG"}, worker={"enabled": False})
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _warm_up(node: ServedNode, ct: list[Path]) -> None:
    """Store two instances so that the imports and caches of the receive path are loaded."""
    sock = _raw_association(node.port)
    for i, path in enumerate(ct[:2]):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _send_store(sock, uid, _dataset(path), message_id=i + 1) == 0
    sock.close()


def _legit_store(port: int, paths: list[Path]) -> list[int]:
    ae = AE("LEGIT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, CT_EXPLICIT)
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    out = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    assoc.release()
    return out


# -- 1 + 2: peer values in logs; over-long Affected SOP Instance UID ------------------------
def test_identifiers_and_newlines_in_every_uid_position_never_reach_a_log(
        served: ServedNode, ct: list[Path], tmp_path: Path) -> None:
    junk = f"1.2.3{FORGED}{PATIENT_NAME} {PATIENT_ID}"
    assert len(junk) <= 64
    base = associate_rq()
    for offset in (26, 10):  # calling AE title, then called AE title (PS3.8 9.3.2)
        bad_ae = f"{PATIENT_ID}\nFORGED".encode().ljust(16)
        rq = base[:offset] + bad_ae + base[offset + 16:]
        sock = _connect(served.port)
        sock.sendall(rq)
        assert read_pdu(sock)[0] == 0x03  # A-ASSOCIATE-RJ
        sock.close()

    # abstract and transfer syntax of a proposed presentation context
    for field_value in (str(CTImageStorage), CT_EXPLICIT):
        bad = f"1.2\n{PATIENT_ID} FORGED {PATIENT_NAME}"[:len(field_value)].encode()
        rq = base.replace(field_value.encode(), bad.ljust(len(field_value), b"9"), 1)
        sock = _connect(served.port)
        sock.sendall(rq)
        assert read_pdu(sock)[0] in (0x02, 0x03, 0x07)  # accepted (context refused) or not
        sock.close()

    sock = _raw_association(served.port)
    uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SOPInstanceUID)
    cases = [
        (junk, _dataset(ct[0]), str(CTImageStorage)),                     # Affected SOP Inst.
        (uid, _dataset(ct[0]), junk),                                      # SOP Class (command)
        (junk, _dataset(ct[0], SOPInstanceUID=junk), str(CTImageStorage)),  # data set SOP Inst.
        (uid, _dataset(ct[0], SOPClassUID=junk), str(CTImageStorage)),     # data set SOP Class
        (uid, _dataset(ct[0], StudyInstanceUID=junk), str(CTImageStorage)),
        (uid, _dataset(ct[0], SeriesInstanceUID=junk), str(CTImageStorage)),
    ]
    answers = [_send_store(sock, affected, data, message_id=i + 1, sop_class=sop_class)
               for i, (affected, data, sop_class) in enumerate(cases)]
    # the SOP Class UID of the command is not checked (the presentation context decides)
    assert answers[1] == 0
    assert all(a is not None and a >= 0xA000 for i, a in enumerate(answers) if i != 1), answers
    # Over-long Affected SOP Instance UID (> 65,535 bytes): a failure status, not an abort.
    long_uid = ("1." + f"{PATIENT_NAME}{FORGED}{PATIENT_ID}" * 3000)[:70_001]
    assert _send_store(sock, long_uid, _dataset(ct[1]), message_id=20) == statuses.INVALID_UID
    sock.sendall(_p_data(1, 0x03, _echo_rq()))
    assert _response_status(sock) == 0  # the association goes on
    sock.close()
    time.sleep(0.5)
    served.stop()

    outputs = [served.log_path, Path(served.data["node"]["log_file"]),
               Path(served.data["node"]["audit_log"])]
    text = "\n".join(p.read_text(errors="replace") for p in outputs)
    assert "instance_refused" in text and "association_rejected" in text
    for needle in (PATIENT_NAME, PATIENT_ID, "FORGED", "DOE"):
        assert needle not in text, needle
    for line in Path(served.data["node"]["audit_log"]).read_text().splitlines():
        json.loads(line)  # one entry per line, nothing forged in between
    sizes = [p.stat().st_size for p in outputs]
    assert max(sizes) < 64 * 1024, sizes  # no amplification of the 70 KB UID


# -- 3: audit write failure -----------------------------------------------------------------
def test_refusals_and_echo_are_answered_when_the_audit_log_cannot_be_written(
        tmp_path: Path, ct: list[Path]) -> None:
    cfg = node_config(tmp_path, node={"audit_log": "/dev/full", "min_free_disk_mb": 10**9})
    with running_node(cfg) as node:
        port = node.scp.port
        assert _legit_store(port, ct[:4]) == [statuses.OUT_OF_RESOURCES] * 4
        ae = AE("ECHO")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert node.audit.failed_writes >= 5
        node.config.node.min_free_disk_mb = 1  # space is back: the sender's retry is stored
        assert _legit_store(port, ct[:4]) == [0] * 4
        with node.db.session() as s:
            assert len(s.execute(select(Instance.id)).all()) == 4


# -- 4: bounded memory ----------------------------------------------------------------------
@pytest.mark.parametrize("sources", ["one address", "250 addresses"])
def test_thousand_sockets_announcing_1mib_requests(served: ServedNode, ct: list[Path],
                                                   sources: str) -> None:
    """From one address the per-address budget holds them; from 250 the global budget does
    (the longest-negotiating connection is cut to make room for a newcomer)."""
    _warm_up(served, ct)
    pid = served.pid
    base = _rss_kb(pid)
    sampler = _RssSampler(pid)
    sampler.start()
    header = struct.pack(">BBI", 0x01, 0, 1 << 20) + b"\x00\x01"
    attackers: list[socket.socket] = []
    # pynetdicom's requestor uses select(), which cannot watch a descriptor >= 1024: keep low
    # descriptors free for the legitimate sender (freed below; the kernel reuses the lowest)
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(16)]
    try:
        for i in range(1000):
            source = ("127.0.0.2" if sources == "one address"
                      else f"127.0.{1 + i // 250}.{i % 250 + 1}")
            try:
                s = _connect(served.port, source=source, timeout=2)
                s.sendall(header)
                attackers.append(s)
            except OSError:
                continue
        assert len(attackers) >= 900
        for fd in spare:
            os.close(fd)
        spare.clear()
        statuses_during = _legit_store(served.port, ct[2:6])
    finally:
        peak = sampler.stop()
        for s in attackers:
            s.close()
        for fd in spare:
            os.close(fd)
    assert statuses_during == [0] * 4
    growth_mb = (peak - base) / 1024
    print(f"1000 x 1 MiB requests from {sources}: RSS growth {growth_mb:.1f} MB, "
          f"peak threads {sampler.peak_threads}")
    assert growth_mb < 50, growth_mb
    assert sampler.peak_threads < 100


def test_empty_pdvs_abort_with_flat_memory(served: ServedNode, ct: list[Path]) -> None:
    _warm_up(served, ct)
    base = _rss_kb(served.pid)
    sampler = _RssSampler(served.pid)
    sampler.start()
    sock = _raw_association(served.port)
    sock.sendall(_p_data(3, 0x03, _store_rq("1.2.3.4")))
    item = struct.pack(">IBB", 2, 3, 0x00)
    pdu = struct.pack(">BBI", 0x04, 0, 6 * 170_000) + item * 170_000  # ~1 MiB of empty PDVs
    sent = 0
    try:
        while sent < 44 << 20:
            sock.sendall(pdu)
            sent += len(pdu)
    except OSError:
        pass
    answer = read_pdu(sock)[0]
    peak = sampler.stop()
    sock.close()
    assert answer in (0x07, 0)  # A-ABORT (or the connection already gone)
    growth_mb = (peak - base) / 1024
    print(f"empty PDVs: {sent / 2**20:.0f} MiB sent before the abort, RSS growth "
          f"{growth_mb:.1f} MB")
    assert growth_mb < 20, growth_mb
    assert _legit_store(served.port, ct[2:3]) == [0]


def test_1gib_c_store_is_refused_without_holding_it(tmp_path: Path, ct: list[Path]) -> None:
    """With the default max_instance_mb (512): spooled to disk as it comes, dropped at 512 MB."""
    node = ServedNode(tmp_path, worker={"enabled": False})
    node.start()
    try:
        _warm_up(node, ct)
        base = _rss_kb(node.pid)
        sampler = _RssSampler(node.pid)
        sampler.start()
        sock = _raw_association(node.port)
        sock.sendall(_p_data(3, 0x03, _store_rq("1.2.3.4.5")))
        chunk = bytes((1 << 20) - 12)
        total, target = 0, 1 << 30
        t0 = time.monotonic()
        while total < target:
            last = total + len(chunk) >= target
            sock.sendall(_p_data(3, 0x02 if last else 0x00, chunk))
            total += len(chunk)
        status = _response_status(sock)
        elapsed = time.monotonic() - t0
        peak = sampler.stop()
        sock.close()
        assert status == statuses.INSTANCE_TOO_LARGE
        growth_mb = (peak - base) / 1024
        print(f"1 GiB C-STORE: refused 0x{status:04X} after {elapsed:.1f} s, RSS growth "
              f"{growth_mb:.1f} MB")
        assert growth_mb < 100, growth_mb
        assert _legit_store(node.port, ct[2:3]) == [0]
        refused = [e for e in _audit(node.data["node"]["audit_log"])
                   if e["event"] == "instance_refused"]
        assert refused and refused[-1]["status"] == "0xC003"
    finally:
        node.stop()
    assert not list((node.storage_dir / ".incoming").glob("*")), "spool file left behind"


def test_large_instance_is_spooled_and_stored_intact(tmp_path: Path, ct: list[Path]) -> None:
    """A 72 MB instance goes to the spool file as it arrives and is stored by a rename."""
    node = ServedNode(tmp_path, worker={"enabled": False})
    node.start()
    try:
        _warm_up(node, ct)
        ds = pydicom.dcmread(ct[3])
        ds.Rows = ds.Columns = 6000
        ds.PixelData = os.urandom(6000 * 6000 * 2)
        data = encode(ds, False, True)
        assert data is not None
        uid = str(ds.SOPInstanceUID)
        base = _rss_kb(node.pid)
        sampler = _RssSampler(node.pid)
        sampler.start()
        sock = _raw_association(node.port)
        sock.sendall(_p_data(3, 0x03, _store_rq(uid)))
        step = (1 << 20) - 12
        for start in range(0, len(data), step):
            last = start + step >= len(data)
            sock.sendall(_p_data(3, 0x02 if last else 0x00, data[start:start + step]))
        status = _response_status(sock)
        peak = sampler.stop()
        sock.close()
        assert status == 0
        growth_mb = (peak - base) / 1024
        print(f"{len(data) / 2**20:.0f} MiB instance spooled: RSS growth {growth_mb:.1f} MB")
        assert growth_mb < 40, growth_mb
        stored = indexed_instances(node.database_url)[uid]
        assert stored.read_bytes().endswith(bytes(data))
        assert not list((node.storage_dir / ".incoming").glob("*"))
    finally:
        node.stop()


# -- 4 + 5: idle peers do not lock senders out; failed negotiations are audited -------------
def test_silent_and_dripping_peers_do_not_keep_a_tls_sender_out(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = ServedNode(tmp_path, node={
        "acse_timeout": 3.0,
        "tls": {"enabled": True, "cert_file": str(pki.server_cert),
                "key_file": str(pki.server_key), "ca_file": str(pki.ca_cert),
                "require_client_cert": True},
    }, worker={"enabled": False})
    node.start()
    idle: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(16):
            idle.append(_connect(node.port, source=f"127.0.0.{i + 2}"))

        def drip() -> None:
            while not stop.wait(0.3):
                for s in idle[8:]:
                    try:
                        s.send(b"\x16")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        time.sleep(0.5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        ae = AE("TLSSCU")
        ae.add_requested_context(Verification)
        t0 = time.monotonic()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SRNODE",
                             tls_args=(ctx, "localhost"))
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        elapsed = time.monotonic() - t0
        assoc.release()
        print(f"TLS sender in after {elapsed:.2f} s with 16 idle peers")
        assert elapsed < 1.0
        time.sleep(4.0)  # past acse_timeout: every idle peer is cut off
        for s in idle:
            s.settimeout(2)
            assert read_pdu(s) == (0, b"")
    finally:
        stop.set()
        for s in idle:
            s.close()
        node.stop()
    failed = [e for e in _audit(node.data["node"]["audit_log"])
              if e["event"] == "negotiation_failed"]
    assert len(failed) >= 16
    assert all("TLS handshake failed" in e["reason"] for e in failed)


def test_aborted_negotiation_and_malformed_request_are_audited(served: ServedNode) -> None:
    sock = _connect(served.port)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 100) + b"\x00\x01" + bytes(20))
    sock.close()  # gone in the middle of its request
    sock = _connect(served.port)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 200_000))  # over the request size cap
    assert read_pdu(sock)[0] == 0x07
    sock.close()
    time.sleep(0.5)
    events = [e for e in _audit(served.data["node"]["audit_log"])
              if e["event"] == "negotiation_failed"]
    assert len(events) == 2, events


# -- 6: graceful stop and reconciliation -----------------------------------------------------
class _RawSender(threading.Thread):
    """Sends instances one C-STORE at a time on one raw association; records how it ended."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.paths = paths
        self.acked: list[str] = []
        self.refused: list[str] = []
        self.ending = ""

    def run(self) -> None:
        sock = _raw_association(self.port)
        sock.settimeout(30)
        try:
            for i, path in enumerate(self.paths):
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                try:
                    sock.sendall(_p_data(3, 0x03, _store_rq(uid, i + 1))
                                 + _p_data(3, 0x02, _dataset(path)))
                except OSError:
                    pass  # the node stopped; its A-ABORT is read below
                pdu_type, body = read_pdu(sock)
                if pdu_type == 0x07:
                    self.ending = "A-ABORT"
                    return
                if pdu_type != 0x04:
                    self.ending = "closed without A-ABORT"
                    return
                status = int(struct.unpack("<H", decode_command(body[6:])[0x0900])[0])
                (self.acked if status == 0 else self.refused).append(uid)
            self.ending = "done"
        finally:
            sock.close()


def test_sigterm_during_four_transfers(tmp_path: Path) -> None:
    node = ServedNode(tmp_path, node={"shutdown_grace_seconds": 5.0},
                      worker={"enabled": False})
    node.start()
    senders = [_RawSender(node.port, make_ct_series(tmp_path / f"ct{i}", n_slices=150,
                                                    rows=64))
               for i in range(4)]
    for s in senders:
        s.start()
    deadline = time.monotonic() + 60
    while sum(len(s.acked) for s in senders) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.process is not None and node.process.proc is not None
    t0 = time.monotonic()
    node.process.proc.terminate()
    node.process.proc.wait(timeout=30)
    stop_s = time.monotonic() - t0
    for s in senders:
        s.join(timeout=30)
    endings = [s.ending for s in senders]
    print(f"SIGTERM: stopped in {stop_s:.2f} s; endings {endings}; acked "
          f"{[len(s.acked) for s in senders]}")
    assert all(e in ("A-ABORT", "done") for e in endings), endings
    indexed = indexed_instances(node.database_url)
    acked = {uid for s in senders for uid in s.acked}
    assert acked <= set(indexed), acked - set(indexed)
    node.start()  # reconciliation at start-up
    node.stop()
    indexed = indexed_instances(node.database_url)
    paths = {str(p) for p in indexed.values()}
    files = [p for p in node.storage_dir.rglob("*.dcm")
             if p.relative_to(node.storage_dir).parts[0] not in ("derived", "quarantine")]
    assert files and all(str(p) in paths for p in files)
    assert storage_problems(node.storage_dir) == []


def test_startup_indexes_a_complete_unindexed_file_and_quarantines_a_broken_one(
        tmp_path: Path, ct: list[Path]) -> None:
    cfg = node_config(tmp_path)
    root = Path(cfg.node.storage_dir)
    placed = []
    for path in ct[:2]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        dst = root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        placed.append(dst)
    placed[1].write_bytes(placed[1].read_bytes()[:400])  # truncated: not indexable
    with running_node(cfg) as node:
        with node.db.session() as s:
            rows = [p for (p,) in s.execute(select(Instance.path))]
    assert [os.path.normpath(p) for p in rows] == [os.path.normpath(placed[0])]
    assert not placed[1].exists()
    assert len(list((root / "quarantine").iterdir())) == 1
    events = [e["event"] for e in _audit(cfg.node.audit_log)]
    assert "file_indexed_at_startup" in events and "file_quarantined" in events


class _SlowService(StorageService):
    """Takes ``delay`` seconds to store (a slow disk), answers success."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = threading.Event()
        self.stored: list[str] = []

    def on_store(self, data: bytes | bytearray | Spool, affected_sop_instance_uid: str,
                 sop_class_uid: str, peer: Peer) -> int:
        self.started.set()
        time.sleep(self.delay)
        self.stored.append(affected_sop_instance_uid)
        return 0


def _acceptor(service: StorageService) -> StorageAcceptor:
    policy = AcceptorPolicy(
        ae_title="SRNODE", require_called_ae_title=True, allowed_calling_ae_titles=[],
        allowed_hosts={}, max_associations=4, acse_timeout=5.0, network_timeout=5.0,
        max_pdu_size=65536, contexts=[build_context(Verification),
                                      build_context(CTImageStorage, [CT_EXPLICIT])])
    server = StorageAcceptor(("127.0.0.1", 0), policy, service)
    server.start()
    return server


@pytest.mark.parametrize(("delay", "grace", "answered"), [(1.0, 5.0, True), (3.0, 0.5, False)])
def test_stop_lets_a_store_in_flight_finish_within_the_grace_period(
        ct: list[Path], delay: float, grace: float, answered: bool) -> None:
    service = _SlowService(delay)
    server = _acceptor(service)
    port = server.server_address[1]
    busy = _raw_association(port)
    idle = _raw_association(port)
    busy.sendall(_p_data(3, 0x03, _store_rq("1.2.3.4")) + _p_data(3, 0x02, _dataset(ct[0])))
    assert service.started.wait(5)
    t0 = time.monotonic()
    server.stop(grace=grace)
    took = time.monotonic() - t0
    assert read_pdu(idle)[0] == 0x07  # idle: A-ABORT at once
    status = _response_status(busy)
    if answered:
        assert status == 0  # the store in flight was answered ...
        assert read_pdu(busy)[0] == 0x07  # ... then the association aborted
        assert took < delay + 1.0
    else:
        assert status is None  # grace over: A-ABORT instead of the answer
        assert took < grace + 6.0
    for s in (busy, idle):
        s.close()
    with pytest.raises(OSError):
        _connect(port, timeout=2)  # no longer accepting


# -- log_safety units ------------------------------------------------------------------------
def test_peer_values_are_neutralised_for_logs_and_audit(tmp_path: Path) -> None:
    import logging

    from dicom_node.audit import AuditLog
    from dicom_node.log_safety import SafeFormatter, safe_ae, safe_fields, safe_text, safe_uid

    junk = f"1.2{FORGED}{PATIENT_NAME}"
    assert safe_uid("1.2.840.10008.1.1") == "1.2.840.10008.1.1"
    assert safe_uid(junk).startswith("<invalid UID #") and PATIENT_NAME not in safe_uid(junk)
    assert safe_uid(junk) == safe_uid(junk) != safe_uid(junk + "x")  # stable, distinguishing
    assert safe_ae("CT01") == "CT01"
    assert safe_ae(f"{PATIENT_ID}\nX").startswith("<invalid AE title #")
    text = safe_text("a\nb\x00c" + "x" * 1000, limit=64)
    assert "\n" not in text and "\\x0a" in text and len(text) < 100
    fields = safe_fields({"sop_instance_uid": junk, "calling_ae": "A\\B", "reason": "r\nr",
                          "contexts": [{"abstract_syntax": junk,
                                        "transfer_syntaxes": [junk, "1.2.840.10008.1.2"]}],
                          "replaced": True})
    dumped = json.dumps(fields)
    assert PATIENT_NAME not in dumped and "FORGED" not in dumped
    assert fields["contexts"][0]["transfer_syntaxes"][1] == "1.2.840.10008.1.2"
    assert fields["replaced"] is True

    record = logging.LogRecord("srnode.scp", logging.WARNING, __file__, 1,
                               "value %s", (f"x{FORGED}",), None)
    line = SafeFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\\x0aCRITICAL" in line

    audit = AuditLog("/dev/full")
    audit.record("echo", calling_ae="X")  # ENOSPC: counted, never raised
    assert audit.failed_writes == 1


def test_malformed_command_fields_get_failure_statuses(ct: list[Path]) -> None:
    service = _SlowService(0.0)
    server = _acceptor(service)
    try:
        sock = _raw_association(server.server_address[1])
        no_message_id = encode_command([
            (0x0002, _ui(str(CTImageStorage))), (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, b"\x01"), (0x0800, struct.pack("<H", 0x0000)), (0x1000, _ui("1.2.3")),
        ])
        sock.sendall(_p_data(3, 0x03, no_message_id) + _p_data(3, 0x02, _dataset(ct[0])))
        assert _response_status(sock) == statuses.CANNOT_UNDERSTAND
        assert _send_store(sock, "9" * 70_000, _dataset(ct[0])) == statuses.INVALID_UID
        sock.sendall(_p_data(1, 0x03, _echo_rq()))
        assert _response_status(sock) == 0
        assert service.stored == []
        sock.close()
    finally:
        server.stop()


def test_large_instance_below_the_disk_floor_is_refused_without_spooling(
        tmp_path: Path, ct: list[Path]) -> None:
    cfg = node_config(tmp_path, node={"min_free_disk_mb": 10**9})
    ds = pydicom.dcmread(ct[0])
    ds.Rows = ds.Columns = 2400  # 11.5 MB: past the spool threshold
    ds.PixelData = bytes(2400 * 2400 * 2)
    data = encode(ds, False, True)
    assert data is not None
    with running_node(cfg) as node:
        sock = _raw_association(node.scp.port)
        assert _send_store(sock, str(ds.SOPInstanceUID), bytes(data)) == \
            statuses.OUT_OF_RESOURCES
        sock.close()
        incoming = Path(cfg.node.storage_dir) / ".incoming"
        assert not incoming.exists() or not list(incoming.iterdir())
    refused = [e for e in _audit(cfg.node.audit_log) if e["event"] == "instance_refused"]
    assert refused and "spool" in refused[0]["reason"]


def test_every_file_write_failing_with_enospc_still_gets_answers(
        tmp_path: Path, ct: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk as the node sees it: every os.write (received file, spool, audit) ENOSPC."""
    import errno

    real_write = os.write
    full = threading.Event()

    def write(fd: int, data: bytes) -> int:
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with running_node(node_config(tmp_path)) as node:
        port = node.scp.port
        full.set()
        assert _legit_store(port, ct[:4]) == [statuses.OUT_OF_RESOURCES] * 4
        ae = AE("ECHO")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert node.audit.failed_writes >= 5
        full.clear()  # space is back: the sender's retry is stored
        assert _legit_store(port, ct[:4]) == [0] * 4
        with node.db.session() as s:
            assert len(s.execute(select(Instance.id)).all()) == 4
