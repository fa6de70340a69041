"""Receive -> completeness -> job queue, through real associations, and the jobs/retry CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom

from storage.job_types import JobParams
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support.dcmtk import storescu
from tests.support.node import (
    node_config,
    node_config_dict,
    running_node,
    srnode_executable,
    write_toml,
)


def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


RULES = [
    {"name": "ct-slice", "modalities": ["CT"], "mode": "slice", "scale": 2, "min_instances": 2},
    {"name": "mr-volume", "modalities": ["MR"], "mode": "volume", "scale": 2,
     "series_description": ".*", "quiet_period_seconds": 1.5},
]


def test_quiet_period_creates_one_job_per_series_and_skips_derived(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=4, rows=32)
    mr = make_mr_series(tmp_path / "mr", n_slices=4, rows=32)
    for p in mr:  # pydicom's MR_small is labelled DERIVED; make this one an original series
        ds = pydicom.dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.save_as(p, enforce_file_format=True)
    single = make_ct_series(tmp_path / "single", n_slices=1, rows=32)  # below min_instances
    # A derived series (as our own output routed back by a PACS would be): never queued
    derived = make_ct_series(tmp_path / "derived", n_slices=3, rows=32)
    for p in derived:
        ds = pydicom.dcmread(p)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "SRNODE"]
        ds.save_as(p, enforce_file_format=True)
    cfg = node_config(tmp_path, rules=RULES)
    with running_node(cfg) as node:
        rc, out = storescu("127.0.0.1", node.scp.port, ct + mr + single + derived,
                           called_ae_title="SRNODE")
        assert rc == 0, out
        queue = JobQueue(node.db)
        # not before the quiet period has passed
        assert queue.list_jobs() == []
        jobs = _wait_for(lambda: len(queue.list_jobs()) >= 2 and queue.list_jobs())
        # more checks run (now, deterministically): still exactly one job per series
        assert node.scheduler.run_once() == [] and node.scheduler.run_once() == []
        jobs = queue.list_jobs()
        by_series = {j["series_instance_uid"]: j for j in jobs}
        ct_uid = str(pydicom.dcmread(ct[0]).SeriesInstanceUID)
        mr_uid = str(pydicom.dcmread(mr[0]).SeriesInstanceUID)
        assert set(by_series) == {ct_uid, mr_uid}, jobs
        assert len(jobs) == 2
        assert by_series[ct_uid]["rule"] == "ct-slice"
        assert by_series[mr_uid]["rule"] == "mr-volume"
        assert by_series[ct_uid]["modality"] == "CT"
        assert all(j["state"] == "queued" for j in jobs)

        # one more instance for the CT series: the queued job is superseded by a fresh one
        extra = make_ct_series(tmp_path / "extra", n_slices=1, rows=32)
        ds = pydicom.dcmread(extra[0])
        ref = pydicom.dcmread(ct[0])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
        ds.save_as(extra[0], enforce_file_format=True)
        rc, out = storescu("127.0.0.1", node.scp.port, extra, called_ae_title="SRNODE")
        assert rc == 0, out

        def ct_jobs() -> list[dict]:
            return [j for j in queue.list_jobs() if j["series_instance_uid"] == ct_uid]

        _wait_for(lambda: len(ct_jobs()) == 2)
        states = sorted(j["state"] for j in ct_jobs())
        assert states == ["queued", "superseded"], ct_jobs()


def test_jobs_and_retry_cli(tmp_path: Path) -> None:
    data = node_config_dict(tmp_path, rules=RULES)
    cfg_path = write_toml(data, tmp_path / "config.toml")
    from dicom_node.config import load_config
    from storage.db import Database

    cfg = load_config(cfg_path)
    db = Database(cfg.node.database_url)
    db.upgrade()
    from storage.filestore import FileStore
    from storage.ingest import store_instance
    from tests.support.headers import read_header

    src = make_ct_series(tmp_path / "ct", n_slices=1, rows=16)[0]
    header = read_header(src)
    store_instance(db, FileStore(tmp_path / "storage"), header, src.read_bytes(), "TEST")
    queue = JobQueue(db)
    job_id = queue.enqueue(header.series_instance_uid, "ct-slice",
                           JobParams(mode="slice", scale=2), max_attempts=1)
    claimed = queue.claim("w1", 60)
    assert claimed is not None and claimed.id == job_id
    assert queue.fail(job_id, "w1", "boom", retryable=True) == "failed"

    exe = srnode_executable()
    out = subprocess.run([exe, "jobs", "--json", "--config", str(cfg_path)],
                         capture_output=True, text=True, check=True).stdout
    jobs = json.loads(out)
    assert [(j["id"], j["state"], j["attempts"], j["error"]) for j in jobs] == [
        (job_id, "failed", 1, "boom")]
    for key in ("series_instance_uid", "modality", "series_description"):
        assert key in jobs[0]
    r = subprocess.run([exe, "retry", str(job_id), "--config", str(cfg_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert queue.get(job_id)["state"] == "queued"
    r = subprocess.run([exe, "retry", "999", "--config", str(cfg_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "999" in r.stderr
    text = subprocess.run([exe, "jobs", "--config", str(cfg_path)],
                          capture_output=True, text=True, check=True).stdout
    assert "queued" in text
    for cmd in (["--help"], ["serve", "--help"], ["echo", "--help"], ["jobs", "--help"],
                ["retry", "--help"], ["enhance", "--help"], ["train", "--help"],
                ["evaluate", "--help"]):
        r = subprocess.run([exe, *cmd], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: srnode" in r.stdout, cmd
    db.dispose()


def test_bad_config_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = "eleven"\n')
    r = subprocess.run([srnode_executable(), "jobs", "--config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "port" in r.stderr
    bad.write_text('[[rules]]\nname = "x"\nmode = "volume"\nscale = 5\n')
    r = subprocess.run([srnode_executable(), "jobs", "--config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "scale" in r.stderr


def test_echo_cli_against_the_running_node(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    with running_node(cfg) as node:
        r = subprocess.run([srnode_executable(), "echo", f"SRNODE@127.0.0.1:{node.scp.port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "0x0000" in r.stdout
    r = subprocess.run([srnode_executable(), "echo", f"SRNODE@127.0.0.1:{node.scp.port}",
                        "--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_include_derived_rule_selects_reformats_but_never_our_own_output(tmp_path: Path) -> None:
    mpr = make_ct_series(tmp_path / "mpr", n_slices=2, rows=16)
    ours = make_ct_series(tmp_path / "ours", n_slices=2, rows=16)
    for paths, image_type in ((mpr, ["DERIVED", "SECONDARY", "MPR"]),
                              (ours, ["DERIVED", "SECONDARY", "AXIAL", "SRNODE"])):
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.ImageType = image_type
            ds.save_as(p, enforce_file_format=True)
    rules = [{"name": "reformats", "modalities": ["CT"], "include_derived": True}]
    cfg = node_config(tmp_path, rules=rules)
    with running_node(cfg) as node:
        rc, out = storescu("127.0.0.1", node.scp.port, mpr + ours, called_ae_title="SRNODE")
        assert rc == 0, out
        queue = JobQueue(node.db)
        jobs = _wait_for(lambda: queue.list_jobs())
        assert node.scheduler.run_once() == []  # a further check queues nothing else
        jobs = queue.list_jobs()
    mpr_uid = str(pydicom.dcmread(mpr[0]).SeriesInstanceUID)
    assert [j["series_instance_uid"] for j in jobs] == [mpr_uid]


def test_status_cli_reports_counts_and_failures(tmp_path: Path) -> None:
    data = node_config_dict(tmp_path, rules=RULES)
    cfg_path = write_toml(data, tmp_path / "config.toml")
    cfg = node_config(tmp_path, rules=RULES)
    cfg.node.database_url = data["node"]["database_url"]
    cfg.node.storage_dir = data["node"]["storage_dir"]
    ct = make_ct_series(tmp_path / "ct", n_slices=3, rows=16)
    with running_node(cfg) as node:
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        queue = JobQueue(node.db)
        jobs = _wait_for(lambda: queue.list_jobs())
        claimed = queue.claim("w", 30)
        queue.fail(claimed.id, "w", "destination PACS refused", retryable=False)
    # the node is stopped: status reports it and exits 1 (unhealthy)
    r = subprocess.run([srnode_executable(), "status", "--json", "--config", str(cfg_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["health"]["failing"] == ["scp"]
    assert status["series"] == 1 and status["instances"] == 3
    assert status["jobs"]["failed"] == 1 and len(jobs) == 1
    assert status["recent_failures"][0]["error"] == "destination PACS refused"
    text = subprocess.run([srnode_executable(), "status", "--config", str(cfg_path)],
                          capture_output=True, text=True).stdout
    assert "1 series, 3 instances" in text and "failed 1" in text


def test_serve_on_a_busy_port_fails_clearly(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        data = node_config_dict(tmp_path, node={"port": port})
        cfg_path = write_toml(data, tmp_path / "config.toml")
        r = subprocess.run([srnode_executable(), "serve", "--config", str(cfg_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "cannot listen" in r.stderr and str(port) in r.stderr
