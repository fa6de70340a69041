"""/healthz, /metrics and ``srnode status`` on real nodes (loopback associations, port 0)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import ConfigError
from tests.dicom_factory import make_ct_series
from tests.support import db as db_support
from tests.support.dcmtk import StoreSCP, echoscu, storescu
from tests.support.node import (
    ROOT,
    node_config,
    node_config_dict,
    running_node,
    srnode_executable,
    write_toml,
)

REQUIRED = {
    "srnode_instances_received", "srnode_instances_refused", "srnode_associations_rejected",
    "srnode_jobs", "srnode_job_stage_seconds", "srnode_series_sent", "srnode_send_failures",
    "srnode_free_disk_bytes", "srnode_engine_device_info", "srnode_jobs_done",
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _url(node: object, path: str) -> str:
    return f"http://127.0.0.1:{node.http.port}{path}"  # type: ignore[attr-defined]


def _scrape(node: object, index_up: bool = True,
            ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    r = requests.get(_url(node, "/metrics"), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    families = list(text_string_to_metric_families(r.text))
    names = {f.name for f in families}
    required = REQUIRED if index_up else REQUIRED - {"srnode_jobs", "srnode_series_sent"}
    assert required <= names, names
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _wait(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail("condition not reached in time")


def test_healthz_ok_then_503_when_disk_is_under_the_floor(tmp_path: Path) -> None:
    with running_node(node_config(tmp_path)) as node:
        r = requests.get(_url(node, "/healthz"), timeout=60)
        body = r.json()
        assert r.status_code == 200, body
        assert body["status"] == "ok" and body["failing"] == []
        assert set(body["checks"]) == {"scp", "index", "disk", "engine"}
        # the same checks from another process: srnode status exits 0
        cfg_path = write_toml(node_config_dict(tmp_path, node={
            "port": node.scp.port, "database_url": node.config.node.database_url}),
            tmp_path / "config.toml")
        st = subprocess.run([srnode_executable(), "status", "--config", str(cfg_path)],
                            capture_output=True, text=True, env=_env(), timeout=120)
        assert st.returncode == 0, st.stdout + st.stderr
        assert "health      ok" in st.stdout
    floor = {"min_free_disk_mb": 10**9, "warn_free_disk_mb": 2 * 10**9}
    with running_node(node_config(tmp_path / "full", node=floor)) as node:
        r = requests.get(_url(node, "/healthz"), timeout=60)
        assert r.status_code == 503
        assert r.json()["failing"] == ["disk"]
        assert "min_free_disk_mb" in r.json()["checks"]["disk"]["detail"]
        cfg_path = write_toml(node_config_dict(tmp_path / "full", node={
            **floor, "port": node.scp.port, "database_url": node.config.node.database_url}),
            tmp_path / "full.toml")
        st = subprocess.run([srnode_executable(), "status", "--json", "--config", str(cfg_path)],
                            capture_output=True, text=True, env=_env(), timeout=120)
        assert st.returncode == 1, st.stdout + st.stderr
        assert '"disk"' in st.stdout


def test_warn_free_disk_reports_but_stays_healthy(tmp_path: Path) -> None:
    with running_node(node_config(tmp_path, node={"warn_free_disk_mb": 10**9})) as node:
        r = requests.get(_url(node, "/healthz"), timeout=60)
        assert r.status_code == 200
        assert "warn_free_disk_mb" in r.json()["warnings"][0]


@pytest.mark.postgres
def test_healthz_503_when_the_index_is_unavailable(tmp_path: Path) -> None:
    with db_support.fresh_database_url("postgresql", tmp_path) as url:
        name = url.rsplit("/", 1)[1]
        cfg = node_config(tmp_path, node={"database_url": url})
        with running_node(cfg) as node:
            assert requests.get(_url(node, "/healthz"), timeout=60).status_code == 200
            with db_support._pg_admin_connect() as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s", (name,))
            try:
                r = requests.get(_url(node, "/healthz"), timeout=60)
                assert r.status_code == 503
                assert r.json()["failing"] == ["index"]
                # /metrics still answers, saying the index is down
                samples = _scrape(node, index_up=False)
                assert _total(samples, "srnode_index_up") == 0
            finally:
                with db_support._pg_admin_connect() as admin:
                    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            _wait(lambda: requests.get(_url(node, "/healthz"), timeout=60).status_code == 200,
                  timeout=30)


def test_metrics_move_after_store_refusal_rejection_and_jobs(tmp_path: Path,
                                                            refused_port: int) -> None:
    """A C-STORE, a refused instance, a rejected association, a delivered and a failed job."""
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS").start()
    down_port = refused_port  # bound, nothing listens there
    rules = [
        {"name": "to-pacs", "modalities": ["CT"], "mode": "slice", "scale": 2,
         "model": "fast", "destinations": ["pacs"]},
        {"name": "to-down", "modalities": ["CT"], "mode": "slice", "scale": 2,
         "model": "fast", "destinations": ["down"]},
    ]
    cfg = node_config(
        tmp_path / "node", rules=rules, worker={"max_attempts": 1},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
             "port": pacs.port},
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down_port},
        ],
    )
    ct = make_ct_series(tmp_path / "ct", n_slices=2, rows=16)
    bad = pydicom.dcmread(ct[0])
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.PixelData = bytes(bad.PixelData)[:64]  # shorter than the matrix: 0xC002
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path)
    with pacs, running_node(cfg, run_worker=True) as node:
        before = _scrape(node)
        rc, out = storescu("127.0.0.1", node.scp.port, ct, called_ae_title="SRNODE")
        assert rc == 0, out
        storescu("127.0.0.1", node.scp.port, [bad_path], called_ae_title="SRNODE")
        echoscu("127.0.0.1", node.scp.port, called_ae_title="NOT-SRNODE")

        def jobs_finished() -> bool:
            # the worker records stage times and send failures once each child has exited
            s = _scrape(node)
            return (_total(s, "srnode_jobs", state="done") >= 1
                    and _total(s, "srnode_jobs", state="failed") >= 1
                    and _total(s, "srnode_job_stage_seconds_count", stage="enhancing")
                    - _total(before, "srnode_job_stage_seconds_count", stage="enhancing") >= 2)

        _wait(jobs_finished, timeout=240)
        after = _scrape(node)
    assert len(pacs.files()) == 2  # the derived series

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("srnode_instances_received_total") == 2
    assert delta("srnode_instances_refused_total") == 1
    assert delta("srnode_instances_refused_total", status="0xC002") == 1
    assert delta("srnode_associations_rejected_total", reason="called_ae_title") == 1
    assert _total(after, "srnode_jobs", state="done") == 1
    assert _total(after, "srnode_jobs", state="failed") == 1
    assert _total(after, "srnode_series_sent_total", destination="pacs") == 1
    assert delta("srnode_send_failures_total", destination="down") == 1
    assert delta("srnode_send_failures_total", destination="pacs") == 0
    assert delta("srnode_job_stage_seconds_count", stage="enhancing") == 2
    # the delivered job ran the model its rule names (fast): super-resolution, not interpolation
    assert delta("srnode_jobs_done_total", choice="model", model="fast") == 1
    assert delta("srnode_jobs_done_total", choice="interpolation") == 0
    assert _total(after, "srnode_free_disk_bytes") > 0
    assert _total(after, "srnode_engine_device_info", device="cpu") == 1


def test_token_required_when_set(tmp_path: Path) -> None:
    with running_node(node_config(tmp_path, http={"port": 0, "token": "s3cret"})) as node:
        assert requests.get(_url(node, "/healthz"), timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(_url(node, "/metrics"), headers=wrong, timeout=60).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert requests.get(_url(node, "/healthz"), headers=good, timeout=60).status_code == 200
        assert requests.get(_url(node, "/metrics"), headers=good, timeout=60).status_code == 200


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path: Path) -> None:
    from dicom_node.app import Node

    exposed = {"host": "0.0.0.0", "port": 0, "token": ""}
    with pytest.raises(ConfigError, match="token"):
        Node(node_config(tmp_path, http=exposed))
    data = node_config_dict(tmp_path, http=exposed)
    cfg_path = write_toml(data, tmp_path / "config.toml")
    r = subprocess.run([srnode_executable(), "serve", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "[http] token" in r.stderr
    assert "srnode serving AE" not in r.stderr  # the SCP never started (it binds port 0)
    # with a token the same bind starts
    with running_node(node_config(tmp_path / "t", http={**exposed, "token": "t0ken"})) as node:
        r2 = requests.get(_url(node, "/healthz"), timeout=60,
                          headers={"Authorization": "Bearer t0ken"})
        assert r2.status_code == 200


def test_finished_jobs_are_counted_by_the_engine_choice() -> None:
    """``srnode_jobs_done``: SR and interpolation (a fallback, a Lanczos blend, or an
    interpolation model a rule named) apart; held, failed and taken-over jobs not at all."""
    from prometheus_client import CollectorRegistry

    from dicom_node.metrics import JOBS_DONE, observe_finished_job
    from storage.job_types import JobState

    registry = CollectorRegistry()
    registry.register(JOBS_DONE)

    def count(choice: str, model: str) -> float:
        return registry.get_sample_value("srnode_jobs_done_total",
                                         {"choice": choice, "model": model}) or 0.0

    before = {k: count(*k) for k in (("model", "fast"), ("interpolation", "lanczos3"),
                                     ("interpolation", "linear"), ("interpolation", "bicubic"))}
    jobs = [
        (JobState.DONE, {"model": "fast", "choice": "model"}),
        (JobState.DONE, {"model": "lanczos3", "choice": "interpolation"}),
        (JobState.DONE, {"model": "linear", "choice": "model"}),  # a rule named it
        (JobState.HELD, {"model": "bicubic", "choice": "interpolation"}),
        (JobState.FAILED, None),
        (JobState.RUNNING, {"model": "bicubic", "choice": "interpolation"}),
    ]
    for state, result in jobs:
        observe_finished_job({"state": state, "result": result, "stage_seconds": {}}, [])
    assert count("model", "fast") - before[("model", "fast")] == 1
    assert count("interpolation", "lanczos3") - before[("interpolation", "lanczos3")] == 1
    assert count("interpolation", "linear") - before[("interpolation", "linear")] == 1
    assert count("interpolation", "bicubic") - before[("interpolation", "bicubic")] == 0
