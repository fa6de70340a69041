"""C-ECHO / C-STORE SCU and DICOM TLS against real peers: dcmtk storescp, Orthanc, pynetdicom."""

from __future__ import annotations

import hashlib
import io
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Destination, TLSConfig
from dicom_node.network import statuses
from dicom_node.network.scu import (
    DestinationUnavailableError,
    SendError,
    echo,
    send_instances,
)
from dicom_node.network.tls import client_ssl_context, server_ssl_context
from tests.support.certs import PKI, make_pki
from tests.support.dcmtk import StoreSCP, echoscu, refusing_port, storescu
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.timeout(120)

LOCALHOST = "127.0.0.1"


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(str(path))


CT = "CT_small.dcm"
MR = "MR_small.dcm"
MR_RLE = "MR_small_RLE.dcm"
MR_J2K = "MR_small_jp2klossless.dcm"
RGB_RLE = "SC_rgb_rle.dcm"
DEFLATED = "image_dfl.dcm"


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _pixel_sha(ds: Dataset) -> str:
    arr = np.ascontiguousarray(ds.pixel_array)
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()


def _received_by_uid(scp: StoreSCP) -> dict[str, Dataset]:
    out = {}
    for path in scp.files():
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _dest(aet: str, port: int, tls: TLSConfig | None = None) -> Destination:
    return Destination(name="peer", ae_title=aet, host=LOCALHOST, port=port, tls=tls or TLSConfig())


# --------------------------------------------------------------------------- dcmtk storescp


def test_echo_storescp(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "in", aet="STORESCP") as scp:
        assert echo(scp.aet, LOCALHOST, scp.port, calling_ae_title="SRNODE") == 0x0000
        rc, out = echoscu(LOCALHOST, scp.port, called_ae_title=scp.aet)
        assert rc == 0, out


def test_send_uncompressed_to_storescp(tmp_path: Path) -> None:
    paths = [_testfile(CT), _testfile(MR)]
    with StoreSCP(tmp_path / "in", accept_all=False) as scp:
        stored: list[str] = []
        report = send_instances(
            _dest(scp.aet, scp.port), paths, calling_ae_title="SRNODE", on_stored=stored.append
        )
        received = _received_by_uid(scp)
    uids = [_uid(p) for p in paths]
    assert report.sent == uids
    assert stored == uids
    assert not report.failed and not report.skipped and not report.decompressed
    assert set(received) == set(uids)
    for path in paths:
        src = pydicom.dcmread(path)
        got = received[str(src.SOPInstanceUID)]
        assert got.SOPClassUID == src.SOPClassUID
        assert got.file_meta.SourceApplicationEntityTitle == "SRNODE"
        assert got.PixelData == src.PixelData


@pytest.mark.parametrize("only", ["+xe", "+xi"], ids=["explicit-only", "implicit-only"])
def test_compressed_is_decompressed_for_uncompressed_only_peer(tmp_path: Path, only: str) -> None:
    paths = [_testfile(MR_RLE), _testfile(MR_J2K), _testfile(RGB_RLE), _testfile(DEFLATED)]
    sources = {p.name: pydicom.dcmread(p) for p in paths}
    assert sources[MR_RLE].file_meta.TransferSyntaxUID == RLELossless
    assert sources[MR_J2K].file_meta.TransferSyntaxUID == JPEG2000Lossless
    # MR_RLE and MR_J2K carry the same SOP Instance UID: send them separately.
    for path in paths:
        with StoreSCP(tmp_path / f"{path.stem}{only}", accept_all=False, extra_args=[only]) as scp:
            report = send_instances(_dest(scp.aet, scp.port), [path], calling_ae_title="SRNODE")
            files = scp.files()
        src = sources[path.name]
        uid = str(src.SOPInstanceUID)
        assert report.sent == [uid]
        assert report.decompressed == [uid]
        assert len(files) == 1
        got = pydicom.dcmread(files[0])
        expected_ts = ImplicitVRLittleEndian if only == "+xi" else ExplicitVRLittleEndian
        assert got.file_meta.TransferSyntaxUID == expected_ts
        assert str(got.SOPInstanceUID) == uid  # lossless transcoding keeps the instance UID
        assert _pixel_sha(got) == _pixel_sha(src)
    # and the two compressions of MR_small decode to the original uncompressed pixels
    assert _pixel_sha(sources[MR_RLE]) == _pixel_sha(pydicom.dcmread(_testfile(MR)))


def test_explicit_file_to_implicit_only_peer(tmp_path: Path) -> None:
    path = _testfile(CT)
    with StoreSCP(tmp_path / "in", accept_all=False, extra_args=["+xi"]) as scp:
        report = send_instances(_dest(scp.aet, scp.port), [path], calling_ae_title="SRNODE")
        files = scp.files()
    src = pydicom.dcmread(path)
    assert src.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert report.sent == [str(src.SOPInstanceUID)] and report.decompressed == []
    got = pydicom.dcmread(files[0])
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PixelData == src.PixelData


def test_compressed_kept_when_peer_accepts_it(tmp_path: Path) -> None:
    path = _testfile(MR_J2K)
    with StoreSCP(tmp_path / "in", accept_all=True) as scp:
        report = send_instances(_dest(scp.aet, scp.port), [path], calling_ae_title="SRNODE")
        files = scp.files()
    assert report.decompressed == []
    got = pydicom.dcmread(files[0])
    src = pydicom.dcmread(path)
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert got.PixelData == src.PixelData


def test_resume_skips_and_reports_each_stored_once(tmp_path: Path) -> None:
    paths = [_testfile(CT), _testfile(MR), _testfile(RGB_RLE)]
    uids = [_uid(p) for p in paths]
    with StoreSCP(tmp_path / "in", accept_all=True) as scp:
        stored: list[str] = []
        report = send_instances(
            _dest(scp.aet, scp.port),
            paths,
            calling_ae_title="SRNODE",
            skip_sop_instance_uids={uids[1]},
            on_stored=stored.append,
        )
        received = set(_received_by_uid(scp))
        # everything already stored: no association is needed at all
        report2 = send_instances(
            _dest(scp.aet, scp.port), paths, calling_ae_title="SRNODE",
            skip_sop_instance_uids=set(uids), on_stored=stored.append,
        )
    assert report.skipped == [uids[1]]
    assert report.sent == [uids[0], uids[2]]
    assert stored == [uids[0], uids[2]]
    assert received == {uids[0], uids[2]}
    assert report2.sent == [] and report2.skipped == uids


def test_destination_down_raises_quickly(tmp_path: Path) -> None:
    with refusing_port() as port:  # bound, nothing listens
        with pytest.raises(DestinationUnavailableError) as info:
            send_instances(_dest("NOBODY", port), [_testfile(CT)], calling_ae_title="SRNODE",
                           timeout=5)
        assert str(port) in str(info.value)
        with pytest.raises(DestinationUnavailableError):
            echo("NOBODY", LOCALHOST, port, timeout=5)


def test_storescu_harness_round_trip(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "in") as scp:
        rc, out = storescu(LOCALHOST, scp.port, [_testfile(CT)], called_ae_title=scp.aet)
        assert rc == 0, out
        assert [_uid(p) for p in scp.files()] == [_uid(_testfile(CT))]


# --------------------------------------------------------------------------- Orthanc


def test_send_to_orthanc_pixel_identical(tmp_path: Path) -> None:
    paths = [_testfile(CT), _testfile(MR_RLE), _testfile(RGB_RLE)]
    with OrthancServer(tmp_path / "orthanc", aet="PACS") as pacs:
        assert echo(pacs.aet, LOCALHOST, pacs.dicom_port) == 0
        report = send_instances(_dest(pacs.aet, pacs.dicom_port), paths, calling_ae_title="SRNODE")
        assert sorted(report.sent) == sorted(_uid(p) for p in paths)
        assert len(pacs.studies()) == 3
        for path in paths:
            src = pydicom.dcmread(path)
            series_id = pacs.find_series(str(src.SeriesInstanceUID))
            assert series_id is not None
            instances = pacs.series_instances(series_id)
            assert len(instances) == 1
            tags = pacs.instance_tags(instances[0]["ID"])
            assert tags["SOPInstanceUID"] == src.SOPInstanceUID
            stored = pydicom.dcmread(io.BytesIO(pacs.instance_file(instances[0]["ID"])))
            assert _pixel_sha(stored) == _pixel_sha(src)
        assert pacs.find_series("1.2.3.4.5.6.7.8.9") is None


def test_orthanc_stores_to_our_listener(tmp_path: Path) -> None:
    """Harness check: Orthanc C-STOREs to a modality given at construction."""
    with StoreSCP(tmp_path / "in", aet="LISTENER") as scp, OrthancServer(
        tmp_path / "orthanc", modalities={"listener": ("LISTENER", LOCALHOST, scp.port)}
    ) as pacs:
        answer = pacs.upload(_testfile(CT))
        result = pacs.store_to_modality("listener", [answer["ParentSeries"]])
        assert result.get("FailedInstancesCount", 0) == 0
        assert [_uid(p) for p in scp.files()] == [_uid(_testfile(CT))]


# --------------------------------------------------------------------------- pynetdicom peers


class _RecordingSCP:
    """A pynetdicom Storage SCP that answers with chosen statuses and records what it got."""

    def __init__(
        self,
        statuses: dict[str, int] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        require_called_aet: bool = False,
    ) -> None:
        self.statuses = statuses or {}
        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PYSCP")
        ae.require_called_aet = require_called_aet
        for sop_class in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self.ae = ae
        self.port = 0  # bound in __enter__ (port 0), then the bound port
        self.ssl_context = ssl_context
        self.server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return self.statuses.get(str(ds.SOPInstanceUID), 0x0000)

    def __enter__(self) -> _RecordingSCP:
        self.server = self.ae.start_server(
            (LOCALHOST, self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self.port = int(self.server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()


def test_per_instance_statuses(tmp_path: Path) -> None:
    ct, mr, rgb = _testfile(CT), _testfile(MR), _testfile(RGB_RLE)
    statuses = {_uid(ct): 0xB000, _uid(mr): 0xA700}
    stored: list[str] = []
    with _RecordingSCP(statuses) as scp:
        report = send_instances(
            _dest("PYSCP", scp.port), [ct, mr, rgb], calling_ae_title="SRNODE",
            on_stored=stored.append,
        )
    assert report.sent == [_uid(ct), _uid(rgb)]
    assert report.warnings == {_uid(ct): 0xB000}
    assert report.failed == {_uid(mr): 0xA700}
    assert stored == [_uid(ct), _uid(rgb)]
    assert report.decompressed == [_uid(rgb)]  # the SCP takes uncompressed only
    assert not report.ok


def test_lost_association_mid_send_keeps_partial_report() -> None:
    """The peer stops answering after the first instance: the error carries what was stored."""
    ct, mr = _testfile(CT), _testfile(MR)
    release = threading.Event()
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received.append(uid)
        if uid == _uid(mr):
            release.wait(20)  # longer than the SCU's DIMSE timeout
        return 0x0000

    ae = AE(ae_title="PYSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(
        (LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    port = int(server.server_address[1])
    stored: list[str] = []
    try:
        with pytest.raises(DestinationUnavailableError) as info:
            send_instances(
                _dest("PYSCP", port), [ct, mr], calling_ae_title="SRNODE",
                on_stored=stored.append, timeout=2,
            )
    finally:
        release.set()
        server.shutdown()
    assert received == [_uid(ct), _uid(mr)]
    assert stored == [_uid(ct)]
    assert info.value.report is not None
    assert info.value.report.sent == [_uid(ct)]
    assert _uid(mr) not in info.value.report.failed


def test_sop_class_not_accepted_is_a_recorded_failure(tmp_path: Path) -> None:
    ct = _testfile(CT)
    ae = AE(ae_title="PYSCP")
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=handlers)
    port = int(server.server_address[1])
    try:
        report = send_instances(
            _dest("PYSCP", port), [ct, _testfile(MR)], calling_ae_title="SRNODE"
        )
    finally:
        server.shutdown()
    assert report.failed == {_uid(ct): statuses.SOP_CLASS_NOT_SUPPORTED}
    assert report.sent == [_uid(_testfile(MR))]
    assert _uid(ct) in report.errors


def test_rejected_association_reports_reason() -> None:
    with _RecordingSCP(require_called_aet=True) as scp:
        with pytest.raises(DestinationUnavailableError) as info:
            send_instances(_dest("WRONG-AET", scp.port), [_testfile(CT)], calling_ae_title="SRNODE")
        assert not scp.received
    assert "rejected" in info.value.reason
    assert "Called AE title not recognised" in info.value.reason


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki: PKI) -> TLSConfig:
    return TLSConfig(
        enabled=True,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        ca_file=str(pki.ca_cert),
        require_client_cert=True,
    )


def _client_tls(pki: PKI, *, with_cert: bool = True, check_hostname: bool = True) -> TLSConfig:
    return TLSConfig(
        enabled=True,
        cert_file=str(pki.client_cert) if with_cert else "",
        key_file=str(pki.client_key) if with_cert else "",
        ca_file=str(pki.ca_cert),
        check_hostname=check_hostname,
    )


@pytest.fixture()
def tls_scp(pki: PKI) -> Iterator[_RecordingSCP]:
    with _RecordingSCP(ssl_context=server_ssl_context(_server_tls(pki))) as scp:
        yield scp


def test_mutual_tls_send_and_echo(tls_scp: _RecordingSCP, pki: PKI) -> None:
    tls = _client_tls(pki)
    assert echo("PYSCP", LOCALHOST, tls_scp.port, tls=tls) == 0
    report = send_instances(
        _dest("PYSCP", tls_scp.port, tls), [_testfile(CT), _testfile(MR_J2K)],
        calling_ae_title="SRNODE",
    )
    assert report.sent == [_uid(_testfile(CT)), _uid(_testfile(MR_J2K))]
    assert [str(ds.SOPInstanceUID) for ds in tls_scp.received] == report.sent
    assert _pixel_sha(tls_scp.received[1]) == _pixel_sha(pydicom.dcmread(_testfile(MR_J2K)))


def test_tls_client_without_certificate_is_refused(tls_scp: _RecordingSCP, pki: PKI) -> None:
    with pytest.raises(DestinationUnavailableError):
        send_instances(
            _dest("PYSCP", tls_scp.port, _client_tls(pki, with_cert=False)), [_testfile(CT)],
            calling_ae_title="SRNODE", timeout=10,
        )
    assert tls_scp.received == []


def test_tls_client_with_untrusted_certificate_is_refused(tls_scp: _RecordingSCP, pki: PKI) -> None:
    tls = TLSConfig(
        enabled=True,
        cert_file=str(pki.rogue_client_cert),
        key_file=str(pki.rogue_client_key),
        ca_file=str(pki.ca_cert),
    )
    with pytest.raises(DestinationUnavailableError):
        send_instances(_dest("PYSCP", tls_scp.port, tls), [_testfile(CT)],
                       calling_ae_title="SRNODE", timeout=10)
    assert tls_scp.received == []


def test_tls_plain_client_gets_no_association(tls_scp: _RecordingSCP) -> None:
    with pytest.raises(DestinationUnavailableError):
        echo("PYSCP", LOCALHOST, tls_scp.port, timeout=5)


def test_tls_server_not_trusted_by_client(tls_scp: _RecordingSCP, pki: PKI) -> None:
    tls = TLSConfig(enabled=True, cert_file=str(pki.client_cert), key_file=str(pki.client_key),
                    ca_file=str(pki.rogue_ca_cert))
    with pytest.raises(DestinationUnavailableError) as info:
        echo("PYSCP", LOCALHOST, tls_scp.port, tls=tls, timeout=5)
    assert "certificate" in info.value.reason.lower()


def _tls11_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """TLS handshake over a loopback socket pair; returns the negotiated version."""
    listener = socket.create_server((LOCALHOST, 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection((LOCALHOST, port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                version = str(tls.version())
                tls.sendall(b"x")
                return version
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_refused(pki: PKI) -> None:
    tls = _server_tls(pki)
    tls.require_client_cert = False
    # control: a permissive server does negotiate TLS 1.1 with this client
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    try:
        assert _handshake(permissive, _tls11_client()) == "TLSv1.1"
    except ssl.SSLError:
        pytest.skip("this OpenSSL build cannot speak TLS 1.1 at all")
    with pytest.raises(ssl.SSLError):
        _handshake(server_ssl_context(tls), _tls11_client())
    assert server_ssl_context(tls).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_ssl_context(_client_tls(pki)).minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_to_dcmtk_storescp(tmp_path: Path, pki: PKI) -> None:
    with StoreSCP(
        tmp_path / "in", tls=(pki.server_key, pki.server_cert, pki.ca_cert)
    ) as scp:
        tls = _client_tls(pki)
        assert echo(scp.aet, LOCALHOST, scp.port, tls=tls) == 0
        report = send_instances(_dest(scp.aet, scp.port, tls), [_testfile(CT)],
                                calling_ae_title="SRNODE")
        assert report.sent == [_uid(_testfile(CT))]
        assert [_uid(p) for p in scp.files()] == report.sent
        with pytest.raises(DestinationUnavailableError):
            echo(scp.aet, LOCALHOST, scp.port, tls=_client_tls(pki, with_cert=False), timeout=5)


def test_send_with_missing_tls_files_is_a_send_error(tmp_path: Path) -> None:
    tls = TLSConfig(enabled=True, ca_file=str(tmp_path / "missing-ca.pem"))
    with _RecordingSCP() as scp:
        with pytest.raises(SendError, match="missing-ca.pem"):
            send_instances(_dest("PYSCP", scp.port, tls), [_testfile(CT)],
                           calling_ae_title="SRNODE")
        assert scp.received == []


def test_echo_peer_without_verification(tmp_path: Path) -> None:
    ae = AE(ae_title="NOECHO")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server((LOCALHOST, 0), block=False)
    port = int(server.server_address[1])
    try:
        with pytest.raises(DestinationUnavailableError, match="No accepted presentation"):
            echo("NOECHO", LOCALHOST, port, timeout=5)
    finally:
        server.shutdown()


def test_tls_missing_files_are_value_errors(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(ValueError, match="cert_file"):
        server_ssl_context(TLSConfig(enabled=True, cert_file=str(tmp_path / "nope.pem"),
                                     key_file=str(pki.server_key), ca_file=str(pki.ca_cert)))
    with pytest.raises(ValueError, match="ca_file"):
        server_ssl_context(TLSConfig(enabled=True, cert_file=str(pki.server_cert),
                                     key_file=str(pki.server_key), require_client_cert=True))
    with pytest.raises(ValueError, match="ca_file"):
        client_ssl_context(TLSConfig(enabled=True))
    with pytest.raises(ValueError, match="cannot load"):
        client_ssl_context(TLSConfig(enabled=True, ca_file=str(pki.ca_cert),
                                     cert_file=str(pki.client_cert), key_file=str(pki.server_key)))


def _ct_copies(src: Dataset, n: int, folder: Path) -> list[Path]:
    """``n`` copies of ``src`` with new SOP Instance UIDs, written to ``folder``."""
    from dicom_node.derive.files import write_datasets

    series = []
    for k in range(n):
        ds = src.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        series.append(ds)
    return write_datasets(series, folder)


def test_one_association_per_send_with_only_the_needed_contexts(tmp_path: Path) -> None:

    # a three-instance CT series (one SOP class, one transfer syntax) and one MR instance
    src = pydicom.dcmread(_testfile(CT))
    paths = _ct_copies(src, 3, tmp_path / "series")
    requests: list[list[tuple[str, tuple[str, ...]]]] = []

    def on_requested(event: evt.Event) -> None:
        rq = event.assoc.requestor.requested_contexts
        requests.append(sorted((str(c.abstract_syntax), tuple(sorted(c.transfer_syntax)))
                               for c in rq))

    ae = AE(ae_title="RECORDER")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(MRImageStorage, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server((LOCALHOST, 0), block=False,
                             evt_handlers=[(evt.EVT_REQUESTED, on_requested),
                                           (evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        port = server.socket.getsockname()[1]
        report = send_instances(_dest("RECORDER", port), paths, calling_ae_title="SRNODE")
        assert len(report.sent) == 3
        report = send_instances(_dest("RECORDER", port), [_testfile(MR)],
                                calling_ae_title="SRNODE")
        assert len(report.sent) == 1
    finally:
        server.shutdown()
    ts = str(src.file_meta.TransferSyntaxUID)
    assert len(requests) == 2  # one association per send, not one per instance
    ct_contexts = {abstract for abstract, _ in requests[0]}
    assert ct_contexts == {str(CTImageStorage)}, requests[0]
    assert all(ts in syntaxes for _, syntaxes in requests[0]), requests[0]
    assert {abstract for abstract, _ in requests[1]} == {str(MRImageStorage)}, requests[1]


def test_the_association_reactor_never_polls_between_two_c_stores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE response cannot be taken by pynetdicom's reactor thread as "unexpected".

    The reactor of a requestor association polls the DIMSE queue in a loop; pynetdicom pauses it
    for each send, with a hand-over that a loaded machine can slip through (the send then waits
    out the DIMSE timeout, a flake seen under 2 test workers).  The SCU keeps the reactor parked
    for the whole send: no poll of the queue from the reactor between the first C-STORE and the
    release.  The polls are recorded on the real association of a real loopback send.
    """
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider


    paths = _ct_copies(pydicom.dcmread(_testfile(CT)), 6, tmp_path / "series")
    window = {"open": False}
    reactor_polls: list[str] = []
    original_get_msg = DIMSEServiceProvider.get_msg
    original_send = Association.send_c_store
    original_release = Association.release

    def get_msg(self: DIMSEServiceProvider, block: bool = False):  # noqa: ANN202
        thread = threading.current_thread()
        if (not block and window["open"] and isinstance(thread, Association)
                and thread.is_requestor):
            reactor_polls.append(thread.name)
        return original_get_msg(self, block)

    def send_c_store(self: Association, *args: object, **kwargs: object):  # noqa: ANN202
        window["open"] = True
        return original_send(self, *args, **kwargs)

    def release(self: Association) -> None:
        window["open"] = False
        original_release(self)

    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", get_msg)
    monkeypatch.setattr(Association, "send_c_store", send_c_store)
    monkeypatch.setattr(Association, "release", release)

    def slow_store(event: evt.Event) -> int:
        threading.Event().wait(0.05)  # the reactor would loop ~50 times while this runs
        return 0x0000

    ae = AE(ae_title="SLOWSCP")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server((LOCALHOST, 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        port = server.socket.getsockname()[1]
        report = send_instances(_dest("SLOWSCP", port), paths, calling_ae_title="SRNODE")
    finally:
        server.shutdown()
    assert len(report.sent) == 6
    assert reactor_polls == [], f"{len(reactor_polls)} reactor polls during the send"
