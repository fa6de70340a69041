"""The node's own DICOM Upper Layer acceptor, spoken to over real loopback sockets.

Protocol corner cases are driven with hand-built PDUs (encoded by pynetdicom's PDU classes);
every case ends with a normal pynetdicom association to show the node is still serving.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.network.acceptor import StorageAcceptor
from dicom_node.network.pdu import decode_command, encode_response, file_meta
from dicom_node.network.service import AcceptorPolicy, Peer, StorageService
from tests.dicom_factory import make_ct_series
from tests.support.raw_dicom import associate_rq


class RecordingService(StorageService):
    """Keeps what it is given (a real service minus the disk)."""

    def __init__(self) -> None:
        self.stored: list[tuple[bytes, str, str, Peer]] = []
        self.rejected: list[str] = []

    def on_rejected(self, peer: Peer, reason: str) -> None:
        self.rejected.append(reason)

    def on_store(self, data: bytes, affected_sop_instance_uid: str, sop_class_uid: str,
                 peer: Peer) -> int:
        self.stored.append((data, affected_sop_instance_uid, sop_class_uid, peer))
        return 0x0000


def _policy(**overrides: object) -> AcceptorPolicy:
    values: dict[str, object] = {
        "ae_title": "SRNODE", "require_called_ae_title": True, "allowed_calling_ae_titles": [],
        "allowed_hosts": {}, "max_associations": 4, "acse_timeout": 5.0,
        "network_timeout": 5.0, "max_pdu_size": 65536,
        "contexts": [build_context(Verification),
                     build_context(CTImageStorage, ["1.2.840.10008.1.2.1"])],
    }
    values.update(overrides)
    return AcceptorPolicy(**values)  # type: ignore[arg-type]


@pytest.fixture
def acceptor() -> tuple[StorageAcceptor, RecordingService]:
    service = RecordingService()
    server = StorageAcceptor(("127.0.0.1", 0), _policy(), service)
    server.start()
    yield server, service
    server.stop()


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a PDU"
        body += chunk
    return pdu_type, body


def _raw_association(port: int, max_length: int = 16384) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(associate_rq(max_length=max_length))
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x02, pdu_type
    ac = A_ASSOCIATE_AC()
    ac.decode(struct.pack(">BBI", 2, 0, len(body)) + body)
    results = {cx.context_id: cx.result for cx in ac.presentation_context}
    assert results == {1: 0, 3: 0}
    return sock


def _p_data(context_id: int, control: int, value: bytes) -> bytes:
    item = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _echo_rq(message_id: int = 7) -> bytes:
    from dicom_node.network.pdu import encode_command

    return encode_command([
        (0x0002, b"1.2.840.10008.1.1\0"), (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)),
    ])


def _still_serving(port: int) -> None:
    ae = AE("CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_responses_are_valid_command_sets() -> None:
    rsp = encode_response(0x0001, 12, 0xA700, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45",
                          error_comment="disk full")
    ds = decode(io.BytesIO(rsp), True, True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 12
    assert ds.Status == 0xA700
    assert ds.AffectedSOPInstanceUID == "1.2.3.45"  # odd length padded with NUL, read back
    assert ds.ErrorComment == "disk full"
    assert ds.CommandDataSetType == 0x0101
    assert ds.CommandGroupLength == len(rsp) - 12
    fields = decode_command(rsp)
    assert struct.unpack("<H", fields[0x0900])[0] == 0xA700
    ok = decode(io.BytesIO(encode_response(0x0030, 1, 0, "1.2.840.10008.1.1")), True, True)
    assert ok.CommandField == 0x8030 and ok.Status == 0 and "ErrorComment" not in ok


def _ct(tmp_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(make_ct_series(tmp_path / "ct", n_slices=1)[0])


def test_file_meta_is_read_back_by_pydicom(tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    body = encode(ds, False, True)  # explicit VR little endian, no file meta
    assert body is not None
    data = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1",
                     "SENDER") + body
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def test_small_pdus_from_the_sender_are_reassembled(acceptor: tuple, tmp_path: Path) -> None:
    server, service = acceptor
    ds = _ct(tmp_path)
    ae = AE("SMALLPDU")
    ae.maximum_pdu_size = 4096  # ours is larger: the sender uses the 64 KiB we announce
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="SRNODE",
                         max_pdu=4096)
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    data, affected, sop_class, peer = service.stored[0]
    assert affected == ds.SOPInstanceUID and sop_class == CTImageStorage
    assert peer.ae_title == "SMALLPDU"
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.PixelData == ds.PixelData


def test_response_is_split_to_the_peers_maximum_length(acceptor: tuple) -> None:
    server, _ = acceptor
    sock = _raw_association(server.server_address[1], max_length=24)
    sock.sendall(_p_data(1, 0x03, _echo_rq(message_id=9)))
    fragments = []
    while True:
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x04 and len(body) <= 24
        length, context_id, control = struct.unpack_from(">IBB", body)
        assert context_id == 1 and control & 0x01
        fragments.append(body[6:4 + length])
        if control & 0x02:
            break
    assert len(fragments) > 3
    rsp = decode(io.BytesIO(b"".join(fragments)), True, True)
    assert rsp.CommandField == 0x8030 and rsp.MessageIDBeingRespondedTo == 9
    sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
    assert _read_pdu(sock)[0] == 0x06
    sock.close()


@pytest.mark.parametrize("case", [
    "p-data-before-association", "unknown-pdu-type", "data-without-command",
    "unaccepted-context", "pdu-over-maximum", "garbage-command",
])
def test_protocol_violations_abort_and_the_node_keeps_serving(
        acceptor: tuple, case: str) -> None:
    server, service = acceptor
    port = server.server_address[1]
    if case == "p-data-before-association":
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(_p_data(1, 0x03, _echo_rq()))
    else:
        sock = _raw_association(port)
        payload = {
            "unknown-pdu-type": struct.pack(">BBI", 0x09, 0, 2) + b"xx",
            "data-without-command": _p_data(3, 0x02, b"\x08\x00\x05\x00"),
            "unaccepted-context": _p_data(5, 0x03, _echo_rq()),
            "pdu-over-maximum": struct.pack(">BBI", 0x04, 0, 65536 + 100),
            "garbage-command": _p_data(1, 0x03, b"\x00\x00\x00\x00\xff\xff\xff\x7f"),
        }[case]
        sock.sendall(payload)
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x07, (case, pdu_type)  # A-ABORT
    assert body[2] == 0x02  # source: service provider
    sock.close()
    assert service.stored == []
    _still_serving(port)


def test_silent_peer_is_dropped_after_the_network_timeout() -> None:
    service = RecordingService()
    server = StorageAcceptor(("127.0.0.1", 0), _policy(network_timeout=0.5), service)
    server.start()
    try:
        sock = _raw_association(server.server_address[1])
        t0 = time.monotonic()
        pdu_type, _ = _read_pdu(sock)
        assert pdu_type == 0x07  # A-ABORT after the idle timeout
        assert time.monotonic() - t0 < 4
        assert _read_pdu(sock) == (0, b"")  # then the connection is closed
        sock.close()
        _still_serving(server.server_address[1])
    finally:
        server.stop()


def test_unsupported_operation_gets_a_status_not_an_abort(acceptor: tuple) -> None:
    from dicom_node.network.pdu import encode_command

    server, _ = acceptor
    sock = _raw_association(server.server_address[1])
    find = encode_command([
        (0x0002, b"1.2.840.10008.1.1\0"), (0x0100, struct.pack("<H", 0x0020)),
        (0x0110, struct.pack("<H", 3)), (0x0800, struct.pack("<H", 0x0101)),
    ])
    sock.sendall(_p_data(1, 0x03, find))
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x04
    rsp = decode(io.BytesIO(body[6:]), True, True)
    assert rsp.CommandField == 0x8020 and rsp.Status == 0x0211
    sock.sendall(_p_data(1, 0x03, _echo_rq()))  # the association goes on
    assert _read_pdu(sock)[0] == 0x04
    sock.close()


def test_stop_closes_open_associations(tmp_path: Path) -> None:
    service = RecordingService()
    server = StorageAcceptor(("127.0.0.1", 0), _policy(), service)
    server.start()
    sock = _raw_association(server.server_address[1])
    assert server.active_count() == 1
    server.stop()
    sock.settimeout(5)
    assert _read_pdu(sock)[0] == 0x07  # an idle association gets an A-ABORT, then the close
    assert _read_pdu(sock) == (0, b"")
    sock.close()


def test_message_left_half_sent_is_dropped_after_the_dimse_timeout() -> None:
    from dicom_node.network.pdu import encode_command

    service = RecordingService()
    server = StorageAcceptor(("127.0.0.1", 0),
                             _policy(network_timeout=30.0, dimse_timeout=0.5), service)
    server.start()
    try:
        sock = _raw_association(server.server_address[1])
        store = encode_command([
            (0x0002, b"1.2.840.10008.5.1.4.1.1.2\0"), (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)), (0x1000, b"1.2.3.4\0"),
        ])
        sock.sendall(_p_data(3, 0x03, store))  # the command; its data set never comes
        t0 = time.monotonic()
        assert _read_pdu(sock)[0] == 0x07
        assert time.monotonic() - t0 < 10  # the dimse timeout, not the 30 s idle one
        sock.close()
        assert service.stored == []
    finally:
        server.stop()


def test_random_pdus_after_association_never_break_the_acceptor() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    service = RecordingService()
    server = StorageAcceptor(("127.0.0.1", 0), _policy(network_timeout=2.0, dimse_timeout=0.3),
                             service)
    server.start()
    port = server.server_address[1]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(pdu_type=st.sampled_from([1, 2, 3, 4, 4, 4, 5, 6, 7, 0x55]),
           body=st.binary(max_size=300),
           context_id=st.sampled_from([1, 3, 5]), control=st.integers(0, 255))
    def one(pdu_type: int, body: bytes, context_id: int, control: int) -> None:
        sock = _raw_association(port)
        try:
            if pdu_type == 4 and control % 2:
                payload = _p_data(context_id, control, body)
            else:
                payload = struct.pack(">BBI", pdu_type, 0, len(body)) + body
            sock.sendall(payload)
            sock.settimeout(5)
            # the acceptor answers (P-DATA, A-RELEASE-RP, A-ABORT) or waits for more / closes
            try:
                pdu, _ = _read_pdu(sock)
                assert pdu in (0, 0x04, 0x06, 0x07)
            except TimeoutError:
                pass
        finally:
            sock.close()

    try:
        one()
        _still_serving(port)
        assert service.stored == []
    finally:
        server.stop()
