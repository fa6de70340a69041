"""The Storage SCP over real loopback associations (pynetdicom and dcmtk peers)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select

from dicom_node.config import Config
from dicom_node.network import statuses
from storage.models import Instance, Series
from tests.support.dcmtk import echoscu, storescu
from tests.support.node import (
    node_config as _node_config,
)
from tests.support.node import (
    running_node,
    sample_file,
    transfer_syntax_variants,
    with_new_uids,
)
from tests.support.raw_dicom import request_association

_ENGINE: list[str] = ["srnode"]


@pytest.fixture(autouse=True, params=["srnode", "pynetdicom"])
def scp_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test on both association engines (``[node] scp_engine``)."""
    _ENGINE[0] = request.param
    yield request.param
    _ENGINE[0] = "srnode"


def node_config(tmp: Path, **sections: Any) -> Config:
    """A test node configuration on the association engine of the current parameter."""
    node = dict(sections.pop("node", None) or {})
    node.setdefault("scp_engine", _ENGINE[0])
    return _node_config(tmp, node=node, **sections)


@pytest.fixture(autouse=True)
def _send_files_as_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte for byte (no decode/re-encode), also garbage ones; restored afterwards."""
    import pynetdicom._config

    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


def _scu(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    return ae


def _send(port: int, paths: list[Path], *, calling: str = "TESTSCU", called: str = "SRNODE",
          exact_ts: bool = True) -> list[int]:
    """Send files (encoded as they are) on one association; return one status per file."""
    ae = _scu(calling)
    contexts = []
    for p in paths:
        meta = pydicom.dcmread(p, stop_before_pixels=True).file_meta
        cx = build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        if not any(c.abstract_syntax == cx.abstract_syntax and
                   c.transfer_syntax == cx.transfer_syntax for c in contexts):
            contexts.append(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, contexts=contexts)
    assert assoc.is_established, "association not established"
    out = []
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            out.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return out


def _count(node, model, **where) -> int:
    with node.db.session() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int(s.execute(q).scalar_one())


def test_echo_with_pynetdicom_and_echoscu(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        ae = _scu()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        rc, out = echoscu("127.0.0.1", node.scp.port, called_ae_title="SRNODE")
        assert rc == 0, out


def test_every_transfer_syntax_is_stored_intact(tmp_path: Path) -> None:
    variants = transfer_syntax_variants(tmp_path / "variants")
    files = {ts: with_new_uids(p, tmp_path / f"in-{i}.dcm") for i, (ts, p) in
             enumerate(variants.items())}
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        statuses_ = _send(node.scp.port, list(files.values()))
        assert statuses_ == [0] * len(files), dict(zip(files, statuses_, strict=True))
        for ts, src in files.items():
            sent = pydicom.dcmread(src)
            with node.db.session() as s:
                row = s.execute(select(Instance).where(
                    Instance.sop_instance_uid == str(sent.SOPInstanceUID))).scalar_one()
                path = Path(row.path)
                assert row.transfer_syntax_uid == ts
            stored = pydicom.dcmread(path)
            assert stored.file_meta.TransferSyntaxUID == UID(ts)
            # pixel data is byte-identical to what was sent, and decodes to the same image
            assert stored.PixelData == sent.PixelData, UID(ts).name
            np.testing.assert_array_equal(stored.pixel_array, sent.pixel_array)
        assert not list(Path(cfg.node.storage_dir).rglob("*.tmp*"))


def test_storescu_sends_classic_and_enhanced_images(tmp_path: Path) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "eCT_Supplemental.dcm", "emri_small.dcm",
             "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm", "693_J2KR.dcm"]
    files = [with_new_uids(sample_file(n), tmp_path / n) for n in names]
    # Legacy Converted Enhanced MR: the same pixels under the legacy SOP class
    legacy = pydicom.dcmread(files[3])
    legacy.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.4"
    legacy.file_meta.MediaStorageSOPClassUID = legacy.SOPClassUID
    legacy.SOPInstanceUID = generate_uid()
    legacy.file_meta.MediaStorageSOPInstanceUID = legacy.SOPInstanceUID
    legacy.save_as(tmp_path / "legacy.dcm", enforce_file_format=True)
    files.append(tmp_path / "legacy.dcm")
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        flags = {"1.2.840.10008.1.2.5": ["-xr"], "1.2.840.10008.1.2.4.80": ["-xt"],
                 "1.2.840.10008.1.2.4.90": ["-xv"]}
        for f in files:  # storescu proposes one transfer syntax family per run
            ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            rc, out = storescu("127.0.0.1", node.scp.port, [f], called_ae_title="SRNODE",
                               extra_args=flags.get(ts, []))
            assert rc == 0 and "Store Failed" not in out, (f.name, out)
        assert _count(node, Instance) == len(files)
        for f in files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert _count(node, Instance, sop_instance_uid=uid) == 1


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, node={"allowed_calling_ae_titles": ["GOODSCU", "HOSTBOUND"],
                                      "allowed_hosts": {"HOSTBOUND": ["10.99.99.99"]}})
    with running_node(cfg) as node:
        port = node.scp.port
        for calling, called, reason in [("EVILSCU", "SRNODE", 3), ("GOODSCU", "NOTSRNODE", 7),
                                        ("HOSTBOUND", "SRNODE", 3)]:
            answer = request_association(port, calling, called)
            # A-ASSOCIATE-RJ, rejected permanent, by the service user, calling/called AE title
            assert (answer.pdu_type, answer.result, answer.source, answer.reason) == (
                0x03, 1, 1, reason), (calling, called, answer)
        ae = _scu("GOODSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert assoc.is_established
        assoc.release()
        rc, _ = echoscu("127.0.0.1", port, called_ae_title="SRNODE", calling_ae_title="EVILSCU")
        assert rc != 0
    audit = Path(cfg.node.audit_log).read_text()
    assert audit.count('"association_rejected"') >= 4
    assert "EVILSCU" in audit


def test_other_sop_classes_are_refused_at_negotiation(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, node={"accept_all_storage": False})
    with running_node(cfg) as node:
        ae = _scu()
        ae.add_requested_context(SecondaryCaptureImageStorage)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE")
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert accepted == {MRImageStorage}
        assert SecondaryCaptureImageStorage in rejected
        assoc.release()
        sc = with_new_uids(sample_file("SC_rgb.dcm"), tmp_path / "sc.dcm")
        rc, out = storescu("127.0.0.1", node.scp.port, [sc], called_ae_title="SRNODE")
        assert rc != 0 or "0xA900" in out or "No presentation context" in out, out
        assert _count(node, Instance) == 0


def test_resent_instance_replaces_the_file_and_keeps_one_row(tmp_path: Path) -> None:
    first = with_new_uids(sample_file("MR_small.dcm"), tmp_path / "a.dcm")
    ds = pydicom.dcmread(first)
    arr = ds.pixel_array.copy()
    arr[0, 0] = 1234
    ds.PixelData = arr.tobytes()
    second = tmp_path / "b.dcm"
    ds.save_as(second, enforce_file_format=True)
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        assert _send(node.scp.port, [first]) == [0]
        assert _send(node.scp.port, [second]) == [0]
        assert _count(node, Instance, sop_instance_uid=str(ds.SOPInstanceUID)) == 1
        with node.db.session() as s:
            path = Path(s.execute(select(Instance.path)).scalar_one())
            series = s.execute(select(Series)).scalar_one()
            assert series.num_instances == 1
        assert pydicom.dcmread(path).pixel_array[0, 0] == 1234
        assert len(list(path.parent.iterdir())) == 1


def _raw_file(tmp: Path, name: str, body: bytes, sop_class: str = MRImageStorage) -> Path:
    """A Part 10 file whose meta is valid and whose data set is ``body`` (sent undecoded)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    path = tmp / name
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(body)
    return path


def test_garbage_truncated_and_invalid_instances_get_failure_statuses(tmp_path: Path) -> None:
    good = with_new_uids(sample_file("MR_small.dcm"), tmp_path / "good.dcm")
    ds = pydicom.dcmread(good)
    encoded = Path(good).read_bytes()
    body_offset = len(encoded) - len(ds.PixelData) - 12  # start of the pixel data element

    no_uid = pydicom.dcmread(good)
    del no_uid.SeriesInstanceUID
    bad_uid = pydicom.dcmread(good)
    bad_uid.StudyInstanceUID = "1.2.3/../../etc"
    short_pixels = pydicom.dcmread(good)
    short_pixels.PixelData = short_pixels.PixelData[:100]
    cases = {}
    for name, d in [("no_uid", no_uid), ("bad_uid", bad_uid), ("short", short_pixels)]:
        d.SOPInstanceUID = generate_uid()
        d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        p = tmp_path / f"{name}.dcm"
        d.save_as(p, enforce_file_format=True)
        cases[name] = p
    # garbage and a file cut in the middle of an element header
    cases["garbage"] = _raw_file(tmp_path, "garbage.dcm", bytes(range(256)) * 8)
    truncated = encoded[: body_offset + 6]
    (tmp_path / "truncated.dcm").write_bytes(truncated)
    cases["truncated"] = tmp_path / "truncated.dcm"

    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        results = {}
        for name, p in cases.items():
            results[name] = _send(node.scp.port, [p])[0]
        # the node keeps serving: a valid instance afterwards is stored
        assert _send(node.scp.port, [good]) == [0]
        assert _count(node, Instance) == 1
    for name, status in results.items():
        assert 0xA000 <= status <= 0xCFFF, (name, hex(status))
    assert results["no_uid"] in (statuses.INVALID_UID, statuses.CANNOT_UNDERSTAND)
    assert results["bad_uid"] == statuses.INVALID_UID
    assert results["short"] in (statuses.INVALID_IMAGE, statuses.CANNOT_UNDERSTAND)
    assert results["truncated"] in (statuses.INVALID_IMAGE, statuses.CANNOT_UNDERSTAND)
    # nothing with a path trick was written anywhere
    assert not list(tmp_path.rglob("etc"))
    audit = Path(cfg.node.audit_log).read_text()
    assert audit.count('"instance_refused"') == len(cases)


def test_disk_floor_answers_out_of_resources_and_keeps_what_it_has(tmp_path: Path) -> None:
    first = with_new_uids(sample_file("CT_small.dcm"), tmp_path / "a.dcm")
    second = with_new_uids(sample_file("CT_small.dcm"), tmp_path / "b.dcm")
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        assert _send(node.scp.port, [first]) == [0]
        free_mb = shutil.disk_usage(cfg.node.storage_dir).free // (1024 * 1024)
        cfg.node.min_free_disk_mb = free_mb + 10_000  # floor above what the disk has
        assert _send(node.scp.port, [second]) == [statuses.OUT_OF_RESOURCES]
        cfg.node.min_free_disk_mb = 1
        assert _count(node, Instance) == 1
        assert _send(node.scp.port, [second]) == [0]
        assert _count(node, Instance) == 2


@pytest.mark.parametrize("n_assoc", [3])
def test_concurrent_associations_store_everything(tmp_path: Path, n_assoc: int) -> None:
    import threading

    series = [[with_new_uids(sample_file("CT_small.dcm"), tmp_path / f"s{a}-{i}.dcm")
               for i in range(10)] for a in range(n_assoc)]
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        results: dict[int, list[int]] = {}

        def run(a: int) -> None:
            results[a] = _send(node.scp.port, series[a])

        threads = [threading.Thread(target=run, args=(a,)) for a in range(n_assoc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(v == [0] * 10 for v in results.values()), results
        assert _count(node, Instance) == 10 * n_assoc


def test_invalid_uid_values_never_reach_the_logs(tmp_path: Path) -> None:
    """A sender that builds UIDs from patient data must not leak it through refusal messages."""
    from tests.support.node import ServeProcess, node_config_dict, write_toml

    data = node_config_dict(tmp_path, node={"log_level": "DEBUG"})
    cfg_path = write_toml(data, tmp_path / "config.toml")
    bad = pydicom.dcmread(sample_file("MR_small.dcm"))
    bad.StudyInstanceUID = "1.2.840.PIDLEAK77"
    bad.SeriesInstanceUID = generate_uid()
    bad.SOPInstanceUID = generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    path = tmp_path / "bad.dcm"
    bad.save_as(path, enforce_file_format=True)
    with ServeProcess(cfg_path, data["node"]["port"], tmp_path / "serve.out") as served:
        assert _send(served.port, [path]) == [statuses.INVALID_UID]
    text = "".join(Path(p).read_text() for p in (tmp_path / "serve.out", data["node"]["log_file"],
                                                data["node"]["audit_log"]))
    assert "instance_refused" in text
    assert "PIDLEAK77" not in text


def test_a_sender_pausing_longer_than_the_quiet_period_is_not_cut(tmp_path: Path) -> None:
    """A series is complete when its association has ended and it stayed quiet, not before."""
    import time

    from storage.jobs import JobQueue
    from tests.dicom_factory import make_ct_series

    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=16)
    quiet = 0.5
    cfg = node_config(tmp_path, series={"quiet_period_seconds": quiet,
                                        "check_interval_seconds": 0.1},
                      rules=[{"name": "ct", "modalities": ["CT"]}])
    with running_node(cfg) as node:
        queue = JobQueue(node.db)
        ae = _scu()
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SRNODE",
                             contexts=[build_context(CTImageStorage)])
        assert assoc.is_established
        try:
            assert [int(assoc.send_c_store(p).Status) for p in ct[:2]] == [0, 0]
            # the sender pauses for many quiet periods with its association open
            paused_until = time.monotonic() + 8 * quiet
            while time.monotonic() < paused_until:
                assert node.scheduler.run_once() == []
                time.sleep(quiet / 2)
            assert queue.list_jobs() == []
            assert [int(assoc.send_c_store(p).Status) for p in ct[2:]] == [0, 0]
        finally:
            assoc.release()
        deadline = time.monotonic() + 30
        while not queue.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        jobs = queue.list_jobs()
    assert [j["instance_count"] for j in jobs] == [len(ct)], jobs
    assert node.scp.receiving_series() == frozenset()
