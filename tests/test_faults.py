"""Fault injection with real processes and real signals: kill -9 of ``srnode serve`` while it
receives, enhances and sends; a dead worker's job taken over after its lease (SQLite and
PostgreSQL); the index database locked; the disk floor reached mid-series.

A destination that is down for a while and comes back (delivered after it returns, with
backoff, other destinations served meanwhile) is covered by
``tests/test_worker.py::test_destination_down_then_up_is_delivered_and_others_are_served``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node import statuses
from storage.db import Database
from storage.jobs import JobQueue
from tests.dicom_factory import make_ct_series
from tests.support import db as db_support
from tests.support.dcmtk import StoreSCP, echoscu, free_port, storescu
from tests.support.faults import (
    RecordingSender,
    ServedNode,
    indexed_instances,
    orthanc_series_counts,
    send_on_one_association,
    sqlite_exclusive_lock,
    storage_problems,
    wait_for_jobs,
)
from tests.support.node import node_config, running_node
from tests.support.orthanc import OrthancServer

FINISHED = ("done", "failed", "held")


def _dest(name: str, ae: str, port: int) -> dict[str, object]:
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port}


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _queue(url: str) -> tuple[Database, JobQueue]:
    db = Database(url)
    return db, JobQueue(db)


# -- 1a: kill -9 while an association is sending -----------------------------------------------
def test_kill9_while_receiving_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "ct", n_slices=200, rows=16)
    node = ServedNode(tmp_path)
    node.start()
    try:
        sender = RecordingSender(node.port, ct)
        sender.start()
        deadline = time.monotonic() + 60
        while len(sender.statuses) < 60 and sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        node.kill9()
        sender.join(timeout=60)
        assert not sender.is_alive()
        acknowledged = sender.acknowledged()
        assert 60 <= len(acknowledged) < len(ct), (len(acknowledged), sender.error)
        assert None in sender.statuses.values() or sender.error  # the association died

        node.start()  # restart: clean-up of interrupted writes, then serve again
        indexed = indexed_instances(node.database_url)
        missing = acknowledged - set(indexed)
        assert not missing, f"{len(missing)} acknowledged instance(s) lost"
        for uid in acknowledged:
            assert indexed[uid].is_file()
            assert str(pydicom.dcmread(indexed[uid]).SOPInstanceUID) == uid
        assert storage_problems(node.storage_dir) == []
        # nothing that was not acknowledged is indexed except the one possibly in flight
        assert len(set(indexed) - acknowledged) <= 1

        # the node serves again: the rest of the series is stored
        rest = [p for p in ct if _uid(p) not in acknowledged]
        assert send_on_one_association(node.port, rest) == [0] * len(rest)
        rc, out = echoscu("127.0.0.1", node.port, called_ae_title="SRNODE")
        assert rc == 0, out
        assert set(indexed_instances(node.database_url)) == {_uid(p) for p in ct}
        assert storage_problems(node.storage_dir) == []
    finally:
        node.stop()
