"""A node with real finished jobs for the console and API tests (built once per session).

A CT series (2 slices) is enhanced in slice mode and sent to a dcmtk storescp (``done``) and to
a port nothing listens on (``failed``); an MR series is enhanced in volume mode (``done``, with
reformats); a DERIVED CT series is skipped.  The node is then restarted without its worker, so
the jobs stay where the tests put them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.config import Config
from storage.job_types import JobParams, JobState
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series, make_mr_series
from tests.support.dcmtk import StoreSCP, refusing_port, storescu
from tests.support.node import node_config, running_node

FINAL = {JobState.DONE, JobState.FAILED, JobState.HELD}


@dataclass
class ConsoleSite:
    """The running node and what the tests look for on it."""

    node: Any
    config: Config
    ct_series: str
    mr_series: str
    derived_series: str
    jobs: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """The HTTP root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.node.http.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base + path

    @property
    def queue(self) -> JobQueue:
        """The node's job queue."""
        return JobQueue(self.node.db)

    def make_job(self, state: str, rule: str = "ct-down") -> int:
        """A new job for the CT series, taken to ``state`` through the real queue transitions.

        ``queued`` is left as enqueued; ``running`` is claimed by a test worker
        (``test-worker``); ``failed`` and ``held`` are claimed and then failed or held.
        """
        queue = self.queue
        job_id = queue.enqueue(self.ct_series, rule, JobParams(destinations=("down",)), 1)
        if state == JobState.QUEUED:
            return job_id
        others: list[int] = []
        while True:  # claim takes the oldest runnable job: hand back any other one
            claimed = queue.claim("test-worker", 300.0)
            assert claimed is not None
            if claimed.id == job_id:
                break
            others.append(claimed.id)
        for other in others:
            queue.fail(other, "test-worker", "handed back by the test", retryable=True)
            if queue.get(other)["state"] == JobState.FAILED:
                queue.retry(other)
        if state == JobState.FAILED:
            queue.fail(job_id, "test-worker", "send failed: down: test failure", retryable=False)
        elif state == JobState.HELD:
            queue.hold(job_id, "test-worker", "held by the safety gate: test")
        return job_id


def _wait_final(queue: JobQueue, count: int, timeout: float = 120.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = queue.list_jobs()
        if len(jobs) >= count and all(j["state"] in FINAL for j in jobs):
            return jobs
        time.sleep(0.3)
    pytest.fail(f"jobs did not finish: {queue.list_jobs()}")


def _derived_copy(paths: list[Path], out: Path) -> tuple[str, list[Path]]:
    """The same CT slices as a new DERIVED series (no rule selects it: a skip reason)."""
    out.mkdir(parents=True, exist_ok=True)
    uid = pydicom.uid.generate_uid()
    written = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        target = out / p.name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return uid, written


@dataclass
class _Built:
    config: Config
    ct: str
    mr: str
    derived: str
    jobs: dict[str, int]


def build(tmp: Path, pacs_port: int, down_port: int, **http: Any) -> _Built:
    """Receive the series and run the real worker until every job finished."""
    rules = [
        {"name": "ct-slice", "modalities": ["CT"], "mode": "slice", "scale": 2, "model": "fast",
         "destinations": ["pacs"]},
        {"name": "ct-down", "modalities": ["CT"], "mode": "slice", "scale": 2, "model": "fast",
         "destinations": ["down"]},
        {"name": "mr-volume", "modalities": ["MR"], "mode": "volume", "scale": 2,
         "model": "fast", "destinations": ["pacs"],
         "include_derived": True},  # pydicom's MR_small is DERIVED\SECONDARY
    ]
    cfg = node_config(
        tmp, rules=rules, worker={"max_attempts": 1}, http={"port": 0, **http},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs_port},
                      {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1",
                       "port": down_port}],
    )
    ct = make_ct_series(tmp / "in" / "ct", n_slices=2, rows=32)
    mr = make_mr_series(tmp / "in" / "mr", n_slices=4, rows=32)
    derived_uid, derived = _derived_copy(ct, tmp / "in" / "derived")
    with running_node(cfg, run_worker=True) as node:
        for files in (ct, mr, derived):
            rc, out = storescu("127.0.0.1", node.scp.port, files, called_ae_title="SRNODE")
            assert rc == 0, out
        jobs = _wait_final(JobQueue(node.db), 3)
    by_rule = {j["rule"]: j for j in jobs}
    assert by_rule["ct-slice"]["state"] == "done", by_rule["ct-slice"]
    assert by_rule["mr-volume"]["state"] == "done", by_rule["mr-volume"]
    assert by_rule["ct-down"]["state"] == "failed", by_rule["ct-down"]
    return _Built(cfg, str(pydicom.dcmread(ct[0]).SeriesInstanceUID),
                  str(pydicom.dcmread(mr[0]).SeriesInstanceUID), derived_uid,
                  {"done": by_rule["ct-slice"]["id"], "volume": by_rule["mr-volume"]["id"],
                   "failed": by_rule["ct-down"]["id"]})


@pytest.fixture(scope="session")
def console_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleSite]:
    """The built node, serving the console and API again without a worker."""
    tmp = tmp_path_factory.mktemp("console")
    with StoreSCP(tmp / "pacs", aet="PACS") as pacs, refusing_port() as down:
        built = build(tmp, pacs.port, down)
        with running_node(built.config, run_worker=False) as node:
            yield ConsoleSite(node, built.config, built.ct, built.mr, built.derived,
                              dict(built.jobs))
