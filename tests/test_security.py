"""Security: association policy (calling AE, host, called AE), DICOM TLS on the SCP and towards
destinations, and no patient identifiers in any log of a real ``srnode serve`` run."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from storage.models import Instance
from tests.dicom_factory import make_ct_series
from tests.support.certs import PKI, make_pki
from tests.support.dcmtk import StoreSCP, echoscu, storescu
from tests.support.node import (
    ServeProcess,
    node_config,
    node_config_dict,
    running_node,
    sample_file,
    with_new_uids,
    write_toml,
)
from tests.support.raw_dicom import request_association

PATIENT_NAME = "Zzyzx^Quentin"
PATIENT_ID = "PID-93731"
BIRTH_DATE = "19020304"
#: Every spelling of the identifiers that must never show up in a log line. A bare digit string
#: counts only where it stands alone: random UIDs (2.25.<128-bit number>) contain any five digits
#: now and then, and that is not a leak.
PHI_NEEDLES = ("zzyzx", "quentin", "pid-93731", "93731", "19020304", "1902-03-04")


def _needle_pattern(needle: str) -> re.Pattern[str]:
    """Match ``needle`` in a lower-cased log line; digit-only needles not inside a longer number."""
    if needle.isdigit():
        return re.compile(rf"(?<![\d.]){needle}(?![\d.])")
    return re.compile(re.escape(needle))


PHI_PATTERNS = tuple(_needle_pattern(n) for n in PHI_NEEDLES)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _ae(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _associate(port: int, calling: str = "TESTSCU", called: str = "SRNODE",
               ssl_context: ssl.SSLContext | None = None) -> Association:
    ae = _ae(calling)
    contexts = [build_context(Verification), build_context(CTImageStorage,
                                                           [ExplicitVRLittleEndian])]
    tls_args = (ssl_context, "localhost") if ssl_context is not None else None
    return ae.associate("127.0.0.1", port, ae_title=called, contexts=contexts, tls_args=tls_args)


def _count(node) -> int:  # noqa: ANN001
    with node.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def _audit(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ------------------------------------------------------------------------- association policy
def test_host_bound_calling_ae_is_accepted_from_its_host_only(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, node={
        "allowed_calling_ae_titles": ["LOCALSCU", "REMOTESCU", "ANYHOST"],
        "allowed_hosts": {"LOCALSCU": ["127.0.0.1"], "REMOTESCU": ["10.11.12.13"]},
    })
    ct = with_new_uids(sample_file("CT_small.dcm"), tmp_path / "ct.dcm")
    with running_node(cfg) as node:
        port = node.scp.port
        # the host check success path: a host-bound title from its own host, storing works
        assoc = _associate(port, "LOCALSCU")
        assert assoc.is_established
        assert int(assoc.send_c_store(pydicom.dcmread(ct)).Status) == 0
        assoc.release()
        # an allow-listed title without a host binding is accepted from anywhere
        assoc = _associate(port, "ANYHOST")
        assert assoc.is_established
        assoc.release()
        # a host-bound title from another host, an unknown title, a wrong called AE title
        for calling, called in (("REMOTESCU", "SRNODE"), ("STRANGER", "SRNODE"),
                                ("LOCALSCU", "OTHERNODE"), ("LOCALSCU", "srnode")):
            answer = request_association(port, calling, called)
            assert answer.rejected and answer.source == 1, (calling, called, answer)
        rc, out = echoscu("127.0.0.1", port, called_ae_title="SRNODE",
                          calling_ae_title="LOCALSCU")
        assert rc == 0, out
        rc, _ = echoscu("127.0.0.1", port, called_ae_title="SRNODE", calling_ae_title="REMOTESCU")
        assert rc != 0
        assert _count(node) == 1
    rejected = [e for e in _audit(cfg.node.audit_log) if e["event"] == "association_rejected"]
    assert [e["calling_ae"] for e in rejected] == ["REMOTESCU", "STRANGER", "LOCALSCU",
                                                   "LOCALSCU", "REMOTESCU"]
    assert all(e["address"] == "127.0.0.1" for e in rejected)


def test_called_ae_title_not_checked_when_disabled(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, node={"require_called_ae_title": False,
                                      "allowed_hosts": {"ONLYME": ["127.0.0.1"]}})
    with running_node(cfg) as node:
        assoc = _associate(node.scp.port, "ONLYME", "WHATEVER")
        assert assoc.is_established
        assoc.release()
        # allowed_hosts alone is an allow-list too: other titles are refused
        answer = request_association(node.scp.port, "SOMEONE", "WHATEVER")
        assert answer.rejected and answer.reason == 3, answer


# ------------------------------------------------------------------------------- TLS on the SCP
def _tls_node(tmp: Path, pki: PKI, **node: object) -> dict:
    return node_config_dict(tmp, node={
        "tls": {"enabled": True, "cert_file": str(pki.server_cert),
                "key_file": str(pki.server_key), "ca_file": str(pki.ca_cert),
                "require_client_cert": True},
        **node,
    })


def _client_context(pki: PKI, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """A bare TLS handshake with the SCP; returns the negotiated protocol version."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return str(tls.version())


def _tls11_client(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def test_tls11_client_works_against_a_permissive_server(pki: PKI) -> None:
    """Control: the TLS 1.1 client below really speaks TLS 1.1, so the SCP's refusal counts."""
    import threading

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.minimum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        assert _handshake(listener.getsockname()[1], _tls11_client(pki)) == "TLSv1.1"
        thread.join(10)


def test_scp_mutual_tls(tmp_path: Path, pki: PKI) -> None:
    from dicom_node.config import parse_config

    cfg = parse_config(_tls_node(tmp_path, pki))
    ct = with_new_uids(sample_file("CT_small.dcm"), tmp_path / "ct.dcm")
    ct2 = with_new_uids(sample_file("CT_small.dcm"), tmp_path / "ct2.dcm")
    dcmtk_tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
    with running_node(cfg) as node:
        port = node.scp.port
        good = _client_context(pki, pki.client_cert, pki.client_key)
        assert _handshake(port, good) in ("TLSv1.2", "TLSv1.3")
        # mutual TLS with a client certificate from the trusted CA: pynetdicom and dcmtk
        assoc = _associate(port, ssl_context=good)
        assert assoc.is_established
        assert int(assoc.send_c_store(pydicom.dcmread(ct)).Status) == 0
        assoc.release()
        rc, out = echoscu("127.0.0.1", port, called_ae_title="SRNODE", extra_args=dcmtk_tls)
        assert rc == 0, out
        rc, out = storescu("127.0.0.1", port, [ct2], called_ae_title="SRNODE",
                           extra_args=dcmtk_tls)
        assert rc == 0 and "Store Failed" not in out, out
        # no client certificate, a certificate from a rogue CA, TLS 1.1, plain TCP: all fail
        no_cert = _client_context(pki, None, None)
        rogue = _client_context(pki, pki.rogue_client_cert, pki.rogue_client_key)
        tls11 = _tls11_client(pki)
        for label, ctx in (("no client cert", no_cert), ("rogue CA", rogue), ("TLS 1.1", tls11)):
            assoc = _associate(port, ssl_context=ctx)
            assert not assoc.is_established, label
        with pytest.raises((ssl.SSLError, OSError)):
            _handshake(port, tls11)
        assert not _associate(port).is_established  # plain TCP to the TLS port
        rc, _ = echoscu("127.0.0.1", port, called_ae_title="SRNODE")
        assert rc != 0
        rc, _ = echoscu("127.0.0.1", port, called_ae_title="SRNODE", extra_args=[
            "+tls", str(pki.rogue_client_key), str(pki.rogue_client_cert), "+cf",
            str(pki.ca_cert)])
        assert rc != 0
        # still serving; nothing but the two good stores was stored
        assoc = _associate(port, ssl_context=good)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert _count(node) == 2


# ------------------------------------------- receive -> job -> TLS send, no PHI in any log line
def _with_patient(paths: list[Path]) -> list[Path]:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.save_as(p, enforce_file_format=True)
    return paths


def _wait_for(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _refused_instance(tmp: Path, port: int, template: Path) -> None:
    """Send an instance with the patient identifiers, a birth date in an invalid format (pydicom
    warns quoting such values) and pixel data too short: refused."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[:100]
    ds.PatientBirthDate = "1902-03-04"
    ds.PatientName = PATIENT_NAME + "^" + "x" * 70  # longer than a PN component may be
    ds.StudyDescription = PATIENT_NAME  # even free text carrying the name
    assoc = _associate(port, "STORESCU")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert 0xA700 <= int(status.Status) <= 0xCFFF


def test_serve_receive_job_tls_send_logs_no_patient_identifiers(
    tmp_path: Path, pki: PKI
) -> None:
    ct = _with_patient(make_ct_series(tmp_path / "ct", n_slices=3, rows=32))
    with StoreSCP(tmp_path / "received", tls=(pki.server_key, pki.server_cert,
                                              pki.ca_cert)) as dest:
        data = node_config_dict(
            tmp_path / "node",
            node={"log_level": "DEBUG",
                  "allowed_calling_ae_titles": ["STORESCU"]},
            destinations=[{"name": "secure", "ae_title": dest.aet, "host": "127.0.0.1",
                           "port": dest.port,
                           "tls": {"enabled": True, "ca_file": str(pki.ca_cert),
                                   "cert_file": str(pki.client_cert),
                                   "key_file": str(pki.client_key),
                                   "check_hostname": True}}],
            rules=[{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                    "destinations": ["secure"]}],
            # long enough that a loaded machine never splits the series into two jobs
            series={"quiet_period_seconds": 4.0, "check_interval_seconds": 0.5},
        )
        (tmp_path / "node").mkdir(parents=True, exist_ok=True)
        config_path = write_toml(data, tmp_path / "node" / "srnode.toml")
        audit_path = Path(data["node"]["audit_log"])
        log_path = Path(data["node"]["log_file"])
        out_path = tmp_path / "serve.out"
        with ServeProcess(config_path, 0, out_path) as served:
            port = served.port
            rc, out = storescu("127.0.0.1", port, ct, called_ae_title="SRNODE")
            assert rc == 0 and "Store Failed" not in out, out
            _refused_instance(tmp_path, port, ct[0])
            rc, _ = echoscu("127.0.0.1", port, called_ae_title="SRNODE",
                            calling_ae_title="EVILSCU")
            assert rc != 0
            first_phase = audit_path.read_bytes()
            _wait_for(lambda: len(dest.files()) >= len(ct), 180, "the derived series")
            _wait_for(lambda: "job_done" in audit_path.read_text(), 60, "job_done")
        received = [pydicom.dcmread(f) for f in dest.files()]
    assert len(received) == len(ct), [f.name for f in dest.files()]
    # the identifiers did flow through: the derived series (sent over TLS) carries them
    assert {str(ds.PatientName) for ds in received} == {PATIENT_NAME}
    assert {str(ds.PatientID) for ds in received} == {PATIENT_ID}
    assert all(ds.Rows == 64 for ds in received)
    logs = {"log file": log_path.read_text(errors="replace"),
            "audit log": audit_path.read_text(errors="replace"),
            "stderr/stdout": out_path.read_text(errors="replace")}
    assert "association accepted" in logs["log file"]  # DEBUG logging really ran
    for where, text in logs.items():
        for line in text.splitlines():
            low = line.lower()
            for pattern in PHI_PATTERNS:
                assert not pattern.search(low), f"{where} has a patient identifier: {line}"
    # the audit log: append-only JSON lines with UIDs, covering every kind of event
    audit_bytes = audit_path.read_bytes()
    assert audit_bytes.startswith(first_phase)
    entries = [json.loads(line) for line in audit_bytes.decode().splitlines()]
    events = {e["event"] for e in entries}
    assert {"instance_received", "instance_refused", "association_rejected", "series_sent",
            "job_done"} <= events, events
    forbidden = {"patient_name", "patient_id", "patient_birth_date", "PatientName",
                 "PatientID", "PatientBirthDate"}
    assert all("time" in e and not forbidden & set(e) for e in entries)
    study = str(pydicom.dcmread(ct[0]).StudyInstanceUID)
    got = [e for e in entries if e["event"] == "instance_received"]
    assert len(got) == len(ct) and all(e["study_instance_uid"] == study for e in got)
    assert {e["sop_instance_uid"] for e in got} == {
        str(pydicom.dcmread(p).SOPInstanceUID) for p in ct}
    sent = [e for e in entries if e["event"] == "series_sent"]
    assert sent and sent[-1]["sent"] == len(ct) and sent[-1]["failed"] == 0
    assert sent[-1]["derived_series_instance_uid"] == str(received[0].SeriesInstanceUID)
