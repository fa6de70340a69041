"""Several processes share one PostgreSQL queue: a receiving node and `srnode worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support.db import fresh_database_url, postgres_unavailable_reason
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.node import (
    node_config,
    node_config_dict,
    running_node,
    srnode_executable,
    write_toml,
)


@pytest.mark.postgres
def test_receiving_node_and_two_worker_processes_share_a_postgresql_queue(tmp_path: Path) -> None:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    series = [make_ct_series(tmp_path / f"ct{i}", n_slices=2, rows=16) for i in range(4)]
    with fresh_database_url("postgresql", tmp_path) as url, StoreSCP(tmp_path / "pacs") as pacs:
        sections = {
            "node": {"database_url": url},
            "destinations": [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1",
                              "port": pacs.port}],
            "rules": [{"name": "r", "modalities": ["CT"], "destinations": ["pacs"]}],
            "worker": {"poll_interval_seconds": 0.2},
        }
        data = node_config_dict(tmp_path, **sections)
        cfg_path = write_toml(data, tmp_path / "config.toml")
        logs = [(tmp_path / f"worker{i}.log").open("wb") for i in range(2)]
        workers = [
            subprocess.Popen([srnode_executable(), "worker", "--config", str(cfg_path)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            for log in logs
        ]
        try:
            cfg = node_config(tmp_path, **sections)
            cfg.node.storage_dir = data["node"]["storage_dir"]
            with running_node(cfg, run_worker=False) as node:  # receive only
                for paths in series:
                    rc, out = storescu("127.0.0.1", node.scp.port, paths,
                                       called_ae_title="SRNODE")
                    assert rc == 0, out
                queue = JobQueue(node.db)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    jobs = queue.list_jobs()
                    if len(jobs) == 4 and all(j["state"] == "done" for j in jobs):
                        break
                    time.sleep(0.5)
                assert [j["state"] for j in jobs] == ["done"] * 4, [j["error"] for j in jobs]
                with node.db.session() as s:
                    from sqlalchemy import select

                    from storage.models import Job
                    owners = {w for (w,) in s.execute(select(Job.worker_id)).all()}
        finally:
            for w in workers:
                os.killpg(w.pid, signal.SIGTERM)
            for w in workers:
                w.wait(timeout=60)
            for log in logs:
                log.close()
        assert len(pacs.files()) == 8  # each derived instance delivered once
        assert len(owners) == 2, owners  # both worker processes took jobs from the shared queue
