"""End to end with real peers: a PACS (Orthanc) sends series to srnode, srnode sends back a new
derived series; the same through dcmtk (storescu -> srnode -> storescp)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pydicom
import pytest

from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.node import node_config, running_node
from tests.support.orthanc import OrthancServer


def _wait_jobs(queue: JobQueue, n: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = queue.list_jobs()
        finished = [j for j in jobs if j["state"] in ("done", "failed", "held")]
        if len(jobs) >= n and len(finished) == len(jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs not finished in time: {queue.list_jobs()}")


def _original(paths: list[Path]) -> list[Path]:
    for p in paths:  # pydicom's MR_small is labelled DERIVED; these play acquired originals
        ds = pydicom.dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if ds.Modality == "CT" else "OTHER"]
        ds.save_as(p, enforce_file_format=True)
    return paths


@pytest.mark.slow
def test_orthanc_sends_series_and_receives_the_derived_series(tmp_path: Path) -> None:
    ct = _original(make_ct_series(tmp_path / "ct", n_slices=5, rows=64))
    mr = _original(make_mr_series(tmp_path / "mr", n_slices=5, rows=32))
    with OrthancServer(tmp_path / "orthanc") as pacs:
        cfg = node_config(
            tmp_path,
            node={"allowed_calling_ae_titles": ["ORTHANC"]},
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                           "port": pacs.dicom_port}],
            rules=[
                # the model named: these small test series are too small for the degradation
                # estimate, which would (rightly) fall back to interpolation under "auto"
                {"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                 "model": "fast", "destinations": ["pacs"]},
                {"name": "mr-x2", "modalities": ["MR"], "mode": "slice", "scale": 2,
                 "model": "fast", "destinations": ["pacs"]},
            ],
        )
        for p in ct + mr:
            pacs.upload(p)
        studies = pacs.studies()
        assert len(studies) == 2
        before = {}
        for inst in pacs.instances():
            before[inst] = hashlib.sha256(pacs.instance_file(inst)).hexdigest()
        with running_node(cfg, run_worker=True) as node:
            # the node bound port 0: tell the PACS where it listens
            pacs.add_modality("srnode", "SRNODE", "127.0.0.1", node.scp.port)
            pacs.store_to_modality("srnode", studies)
            jobs = _wait_jobs(JobQueue(node.db), 2)
        assert [j["state"] for j in jobs] == ["done", "done"], jobs
        for src, rows in ((ct, 64), (mr, 32)):
            first = pydicom.dcmread(src[0])
            study = pacs.lookup(str(first.StudyInstanceUID))[0]["ID"]
            series = pacs.study_series(study)
            assert len(series) == 2, series
            derived = [s for s in series
                       if s["MainDicomTags"]["SeriesInstanceUID"] != first.SeriesInstanceUID]
            assert len(derived) == 1
            instances = pacs.series_instances(derived[0]["ID"])
            assert len(instances) == len(src)
            tags = pacs.instance_tags(instances[0]["ID"])
            assert tags["ImageType"].split("\\")[:2] == ["DERIVED", "SECONDARY"]
            assert "SRNODE" in tags["ImageType"]
            assert tags["SeriesDescription"].startswith("SR x2")
            assert int(tags["Rows"]) == 2 * rows
            assert tags["StudyInstanceUID"] == first.StudyInstanceUID
            assert tags["FrameOfReferenceUID"] == first.FrameOfReferenceUID
            assert tags["PatientID"] == first.PatientID
        # the originals are unchanged, byte for byte
        for inst, digest in before.items():
            assert hashlib.sha256(pacs.instance_file(inst)).hexdigest() == digest
        assert len(pacs.instances()) == 2 * (len(ct) + len(mr))
    # and patient identifiers never reached the logs
    log = Path(cfg.node.log_file).read_text() + Path(cfg.node.audit_log).read_text()
    for p in (ct[0], mr[0]):
        ds = pydicom.dcmread(p)
        for value in (str(ds.PatientName), str(ds.PatientID)):
            if value:
                assert value not in log


def test_storescu_to_srnode_to_storescp(tmp_path: Path) -> None:
    ct = _original(make_ct_series(tmp_path / "ct", n_slices=4, rows=32))
    with StoreSCP(tmp_path / "received") as dest:
        cfg = node_config(
            tmp_path,
            destinations=[{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1",
                           "port": dest.port}],
            rules=[{"name": "ct-x2", "modalities": ["CT"], "mode": "slice", "scale": 2,
                    "destinations": ["archive"]}],
        )
        with running_node(cfg, run_worker=True) as node:
            rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
            assert rc == 0, out
            jobs = _wait_jobs(JobQueue(node.db), 1)
            assert jobs[0]["state"] == "done", jobs
            result = jobs[0]["result"]
        files = dest.files()
        assert len(files) == len(ct)
        uids = set()
        for f in files:
            ds = pydicom.dcmread(f)
            uids.add(str(ds.SeriesInstanceUID))
            assert ds.Rows == 64 and ds.Columns == 64
            assert "SRNODE" in ds.ImageType
            assert len(ds.SourceImageSequence) >= 1
        assert uids == {result["derived_series_instance_uid"]}
        assert set(result["stage_seconds"]) >= {"loading", "enhancing", "sending"}
