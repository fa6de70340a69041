"""Bad input over real associations: a generated corpus of malformed instances, each answered with
a clear DICOM status and an audit entry while valid traffic on a second association is stored
intact; series with mixed orientation or matrix are stored and their job fails clearly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from storage.filestore import SPOOL_DIR
from storage.jobs import JobQueue
from storage.models import Instance
from tests.dicom_factory import make_ct_series
from tests.support import db as db_support
from tests.support.dcmtk import storescu
from tests.support.malformed import (
    MalformedCase,
    base_dataset,
    check_received,
    encode,
    malformed_corpus,
    part10,
    split_meta,
)
from tests.support.node import node_config, running_node

db_url = db_support.db_url

FAILURE_RANGE = range(0xA700, 0xD000)


@pytest.fixture(autouse=True)
def _send_files_as_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte for byte (no decode/re-encode), also broken ones; restored afterwards."""
    import pynetdicom._config

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


def _ae(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def _audit_entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _instance_count(node) -> int:  # noqa: ANN001
    with node.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def _stored_path(node, sop_uid: str) -> Path | None:  # noqa: ANN001
    with node.db.session() as s:
        row = s.execute(select(Instance.path).where(Instance.sop_instance_uid == sop_uid)).first()
    return Path(row[0]) if row else None


def _data_set_bytes(part10_bytes: bytes) -> bytes:
    return part10_bytes[split_meta(part10_bytes)[1]:]


def _send_case(port: int, case: MalformedCase, path: Path) -> tuple[str, int | None]:
    """Send one case on its own association: ('status', code) or ('negotiation', None)."""
    meta = case.meta
    ae = _ae("BADSCU")
    cx = build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE", contexts=[cx])
    if not assoc.is_established:
        return "negotiation", None
    try:
        if not assoc.accepted_contexts:
            return "negotiation", None
        status = assoc.send_c_store(path)
        return "status", int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


class _ValidTraffic(threading.Thread):
    """Valid CT instances on one long association while the bad traffic runs."""

    def __init__(self, folder: Path, count: int) -> None:
        super().__init__(daemon=True)
        self.port = 0
        self.files: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ds = base_dataset("CT_small.dcm")
            path = folder / f"valid-{i}.dcm"
            path.write_bytes(part10(encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    ExplicitVRLittleEndian))
            self.files.append(path)
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = _ae("GOODSCU")
            assoc = ae.associate("127.0.0.1", self.port, ae_title="SRNODE",
                                 contexts=[build_context(CTImageStorage, [ExplicitVRLittleEndian])])
            assert assoc.is_established
            try:
                for path in self.files:
                    status = assoc.send_c_store(path)
                    self.statuses.append(int(status.Status) if "Status" in status else -1)
                    self.stop.wait(0.05)
            finally:
                assoc.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_malformed_corpus_gets_clear_statuses_and_valid_traffic_is_intact(tmp_path: Path) -> None:
    corpus = malformed_corpus()
    assert len(corpus) >= 100
    cases_dir = tmp_path / "cases"
    paths = {case.name: case.write(cases_dir) for case in corpus}
    cfg = node_config(tmp_path / "node")
    audit_path = Path(cfg.node.audit_log)
    node_dir = Path(cfg.node.storage_dir).parent
    node_dir.mkdir(parents=True, exist_ok=True)
    valid = _ValidTraffic(tmp_path / "valid", 40)
    outside_before = {p for p in tmp_path.parent.rglob("*") if not p.is_relative_to(node_dir)}
    results: dict[str, tuple[str, int | None]] = {}
    with running_node(cfg) as node:
        port = node.scp.port
        valid.port = port
        valid.start()
        for case in corpus:
            before = len(_audit_entries(audit_path))
            kind, status = _send_case(port, case, paths[case.name])
            results[case.name] = (kind, status)
            sop_uid = str(case.meta.MediaStorageSOPInstanceUID)
            if case.expect == "negotiation":
                assert kind == "negotiation", (case.name, status)
                assert _stored_path(node, sop_uid) is None, case.name
                mine = [e for e in _audit_entries(audit_path)[before:]
                        if e.get("calling_ae") == "BADSCU"]
                assert [e["event"] for e in mine] == ["contexts_rejected"], (case.name, mine)
                assert mine[0]["contexts"][0]["transfer_syntaxes"] == [
                    str(case.meta.TransferSyntaxUID)], mine
                continue
            assert kind == "status" and status is not None, case.name
            if case.expect == "refuse":
                assert status in FAILURE_RANGE, (case.name, hex(status))
            elif case.expect == "accept":
                assert status == 0, (case.name, hex(status))
            else:
                assert status == 0 or status in FAILURE_RANGE, (case.name, hex(status))
            # exactly one audit entry per answered C-STORE from this association, matching
            mine = [e for e in _audit_entries(audit_path)[before:]
                    if e.get("calling_ae") == "BADSCU"]
            assert len(mine) == 1, (case.name, mine)
            if status == 0:
                assert mine[0]["event"] == "instance_received", case.name
                stored = _stored_path(node, sop_uid)
                assert stored is not None, case.name
                assert _data_set_bytes(stored.read_bytes()) == _data_set_bytes(case.data)
                pydicom.dcmread(stored)  # parses
            else:
                assert mine[0]["event"] == "instance_refused", case.name
                assert mine[0]["status"] == f"0x{status:04X}", (case.name, mine[0])
                assert mine[0]["reason"], case.name
        valid.stop.set()
        valid.join(120)
        assert not valid.is_alive()
        assert valid.error is None, valid.error
        assert valid.statuses == [0] * len(valid.files)
        # the node keeps serving
        ae = _ae("GOODSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        # valid traffic stored intact, byte for byte
        for path in valid.files:
            sent = path.read_bytes()
            stored = _stored_path(node, str(split_meta(sent)[0].MediaStorageSOPInstanceUID))
            assert stored is not None
            assert _data_set_bytes(stored.read_bytes()) == _data_set_bytes(sent)
        accepted = [n for n, (_k, s) in results.items() if s == 0]
        assert _instance_count(node) == len(valid.files) + len(accepted)
    storage = Path(cfg.node.storage_dir)
    dcm_files = [p for p in storage.rglob("*") if p.is_file()]
    assert all(p.suffix == ".dcm" and not p.name.startswith(".tmp-") for p in dcm_files), dcm_files
    assert len(dcm_files) == len(valid.files) + len(accepted)
    # the spool folder holds nothing once every instance is answered
    assert list((storage / SPOOL_DIR).iterdir()) == []
    for p in storage.rglob("*"):  # every component under the root is a UID (or UID.dcm)
        if p == storage / SPOOL_DIR:
            continue
        assert all(part.replace(".", "").isdigit() for part in
                   p.relative_to(storage).with_suffix("").parts), p
    outside_after = {p for p in tmp_path.parent.rglob("*") if not p.is_relative_to(node_dir)}
    assert outside_after == outside_before
    assert not Path("/tmp/srnode-escape").exists()
    # every kind of answer came up: parse failures, bad UIDs, bad images, SOP class mismatch
    answers = {s for _k, s in results.values()}
    assert {0xC000, 0xC001, 0xC002, 0xA900} <= answers, answers


def test_malformed_corpus_in_process_on_each_database(tmp_path: Path, db_url: str) -> None:
    """The receive path (``StorageSCP.receive``) on SQLite and PostgreSQL: same answers."""
    from dicom_node.app import Node

    node = Node(node_config(tmp_path, node={"database_url": db_url}))
    try:
        for case in malformed_corpus():
            if case.expect == "negotiation":
                continue
            meta = case.meta
            status = check_received(node, case.data, str(meta.MediaStorageSOPInstanceUID),
                                    str(meta.MediaStorageSOPClassUID))
            if case.expect == "refuse":
                assert status in FAILURE_RANGE, (case.name, hex(status))
    finally:
        node.db.dispose()


def _original_ct(folder: Path, n: int, rows: int) -> list[Path]:
    return make_ct_series(folder, n_slices=n, rows=rows)


def test_mixed_orientation_or_matrix_is_stored_then_the_job_fails_clearly(tmp_path: Path) -> None:
    oriented = _original_ct(tmp_path / "orient", 4, 32)
    ds = pydicom.dcmread(oriented[2])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal slice in an axial series
    ds.save_as(oriented[2], enforce_file_format=True)
    matrix = _original_ct(tmp_path / "matrix", 3, 32)
    odd = make_ct_series(tmp_path / "odd", n_slices=1, rows=16)[0]
    ds = pydicom.dcmread(odd)
    ref = pydicom.dcmread(matrix[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.InstanceNumber = 4
    ds.save_as(odd, enforce_file_format=True)
    matrix.append(odd)
    # volume mode: slice mode would leave the odd image out and enhance the rest (issue 12)
    cfg = node_config(tmp_path, rules=[{"name": "r", "modalities": ["CT"], "mode": "volume",
                                        "scale": 2}])
    with running_node(cfg, run_worker=True) as node:
        for files in (oriented, matrix):
            rc, out = storescu("127.0.0.1", node.scp.port, files, called_ae_title="SRNODE")
            assert rc == 0 and "Store Failed" not in out, out
        assert _instance_count(node) == len(oriented) + len(matrix)
        queue = JobQueue(node.db)
        deadline = time.monotonic() + 120
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            jobs = queue.list_jobs()
            if len(jobs) == 2 and all(j["state"] in ("failed", "done", "held") for j in jobs):
                break
            time.sleep(0.3)
    assert len(jobs) == 2, jobs
    by_series = {j["series_instance_uid"]: j for j in jobs}
    orient_job = by_series[str(pydicom.dcmread(oriented[0]).SeriesInstanceUID)]
    matrix_job = by_series[str(ref.SeriesInstanceUID)]
    for job in (orient_job, matrix_job):
        assert job["state"] == "failed", job
        assert job["attempts"] == 1, job  # permanent: not retried
    assert "orientation" in orient_job["error"].lower(), orient_job["error"]
    assert "matrix" in matrix_job["error"].lower() or "rows" in matrix_job["error"].lower()
