"""Helpers for the fault-injection tests: a real ``srnode serve`` to kill, a recording sender,
a held SQLite lock, and checks of what a node left in its storage folder."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, build_context
from sqlalchemy import select

from storage.db import Database
from storage.jobs import JobQueue
from storage.models import Instance
from tests.support.dcmtk import dcmtk_command, dcmtk_env
from tests.support.node import ServeProcess, node_config_dict, write_toml

JobDict = dict[str, Any]


class ServedNode:
    """A config file plus a :class:`ServeProcess` that can be killed and started again.

    Parameters
    ----------
    tmp
        Folder for the config, storage, database and logs.
    name
        Distinguishes several nodes in one folder (config and log file names).
    sections
        Overrides passed to :func:`tests.support.node.node_config_dict`.
    """

    def __init__(self, tmp: Path, name: str = "node", **sections: Mapping[str, Any]) -> None:
        self.data = node_config_dict(tmp, **sections)
        self.config_path = write_toml(self.data, tmp / f"{name}.toml")
        self.port = int(self.data["node"]["port"])
        self.log_path = tmp / f"{name}-serve.log"
        self.process: ServeProcess | None = None

    @property
    def storage_dir(self) -> Path:
        """The node's ``storage_dir``."""
        return Path(self.data["node"]["storage_dir"])

    @property
    def database_url(self) -> str:
        """The node's ``database_url``."""
        return str(self.data["node"]["database_url"])

    @property
    def pid(self) -> int:
        """Process id of the running ``srnode serve``."""
        assert self.process is not None and self.process.proc is not None
        return int(self.process.proc.pid)

    def start(self) -> ServedNode:
        """Start ``srnode serve`` and wait until it listens."""
        configured = int(self.data["node"]["port"])
        self.process = ServeProcess(self.config_path, configured, self.log_path).start()
        self.port = self.process.port  # port 0: the port this start bound
        return self

    def kill9(self) -> None:
        """SIGKILL the node's whole process group (job child processes included)."""
        if self.process is not None:
            self.process.kill9()

    def stop(self) -> None:
        """SIGTERM the node (SIGKILL if it does not stop)."""
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        """What ``srnode serve`` printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for_jobs(
    queue: JobQueue, predicate: Callable[[list[JobDict]], bool], timeout: float = 90.0,
    interval: float = 0.1, what: str = "condition",
) -> list[JobDict]:
    """Poll ``queue.list_jobs()`` until ``predicate`` holds for a non-empty list.

    Raises
    ------
    AssertionError
        After ``timeout`` seconds, with the last job list.
    """
    deadline = time.monotonic() + timeout
    jobs: list[JobDict] = []
    while time.monotonic() < deadline:
        try:
            jobs = queue.list_jobs()
        except Exception:  # noqa: BLE001 - the database may be briefly locked by a dying node
            jobs = []
        if jobs and predicate(jobs):
            return jobs
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout} s: {jobs}")


def scu_ae(calling: str = "FAULTSCU", timeout: float = 15.0) -> AE:
    """A pynetdicom Application Entity for sending, with all three timeouts set."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


class RecordingSender(threading.Thread):
    """Send files on one association in a thread, recording the C-STORE status of each.

    ``statuses`` maps SOP Instance UID to the status the SCP answered (``None``: no response,
    e.g. the association was aborted). Sending stops at the first missing response.
    """

    def __init__(self, port: int, paths: Sequence[Path], called: str = "SRNODE") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.paths = list(paths)
        self.called = called
        self.statuses: dict[str, int | None] = {}
        # the test thread polls acknowledged() while this thread records statuses
        self._lock = threading.Lock()
        self.error: str = ""

    def run(self) -> None:
        """Associate, send every file in order, release (or give up when aborted)."""
        ae = scu_ae()
        contexts = []
        for p in self.paths:
            meta = pydicom.dcmread(p, stop_before_pixels=True).file_meta
            cx = build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
            if not any(c.abstract_syntax == cx.abstract_syntax
                       and c.transfer_syntax == cx.transfer_syntax for c in contexts):
                contexts.append(cx)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called, contexts=contexts)
        if not assoc.is_established:
            self.error = "association not established"
            return
        try:
            for p in self.paths:
                uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                try:
                    rsp = assoc.send_c_store(p)
                except Exception as exc:  # noqa: BLE001 - the peer was killed under us
                    self.error = f"{type(exc).__name__}: {exc}"
                    with self._lock:
                        self.statuses[uid] = None
                    return
                status = int(rsp.Status) if "Status" in rsp else None
                with self._lock:
                    self.statuses[uid] = status
                if status is None or not assoc.is_established:
                    return
        finally:
            if assoc.is_established:
                assoc.release()

    def acknowledged(self) -> set[str]:
        """SOP Instance UIDs answered with success (0x0000)."""
        with self._lock:
            return {uid for uid, s in self.statuses.items() if s == 0}


def send_on_one_association(port: int, paths: Sequence[Path],
                            called: str = "SRNODE") -> list[int | None]:
    """Send ``paths`` on one association; return the status of each (``None``: no answer)."""
    sender = RecordingSender(port, paths, called)
    sender.run()
    if sender.error == "association not established":
        raise AssertionError(sender.error)
    return [sender.statuses.get(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
            for p in paths]


def indexed_instances(database_url: str) -> dict[str, Path]:
    """SOP Instance UID -> stored path of every indexed instance (a fresh connection)."""
    db = Database(database_url)
    try:
        with db.session() as s:
            rows = s.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    finally:
        db.dispose()
    return {str(uid): Path(path) for uid, path in rows}


def storage_problems(storage_dir: Path, skip: Sequence[str] = ("derived",)) -> list[str]:
    """Files under ``storage_dir`` that are not complete, parseable ``*.dcm`` files.

    Folders named in ``skip`` (first level) are not examined.
    """
    problems: list[str] = []
    for path in sorted(storage_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(storage_dir)
        if rel.parts[0] in skip:
            continue
        if path.suffix != ".dcm" or path.name.startswith("."):
            problems.append(f"{rel}: not a stored instance")
            continue
        try:
            ds = pydicom.dcmread(path)
            ds.PixelData  # noqa: B018 - force reading to the end
            if len(ds.PixelData) < int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8:
                problems.append(f"{rel}: pixel data too short")
        except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt file
            problems.append(f"{rel}: {type(exc).__name__}: {exc}")
    return problems


@contextmanager
def sqlite_exclusive_lock(database_path: Path) -> Iterator[sqlite3.Connection]:
    """Hold ``BEGIN EXCLUSIVE`` on an SQLite database from another connection until exit."""
    conn = sqlite3.connect(database_path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def orthanc_series_counts(pacs: Any, series_instance_uids: Sequence[str] | None = None
                          ) -> dict[str, int]:
    """Series Instance UID -> number of instances Orthanc holds (all series or those given)."""
    out: dict[str, int] = {}
    for sid in pacs.series():
        info = pacs.get(f"/series/{sid}")
        uid = str(info["MainDicomTags"]["SeriesInstanceUID"])
        if series_instance_uids is None or uid in series_instance_uids:
            out[uid] = len(info["Instances"])
    return out


class StorescuSender:
    """dcmtk ``storescu -v`` sending files on one association in the background.

    Its verbose output names each file before its C-STORE and reports each response, which is
    how :meth:`acknowledged` knows which files the SCP answered with success.
    """

    def __init__(self, port: int, paths: Sequence[Path], log_path: Path,
                 called: str = "SRNODE") -> None:
        self.args = [dcmtk_command("storescu"), "-v", "-aet", "FAULTSCU", "-aec",
                     called, "-R", "-to", "15", "127.0.0.1", str(port), *[str(p) for p in paths]]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StorescuSender:
        """Start storescu (output to ``log_path``)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=dcmtk_env())
        return self

    def output(self) -> str:
        """What storescu printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def acknowledged(self) -> list[Path]:
        """Files answered with ``Received Store Response (Success)``, in sending order."""
        done: list[Path] = []
        current: Path | None = None
        for line in self.output().splitlines():
            if "Sending file: " in line:
                current = Path(line.split("Sending file: ", 1)[1].strip())
            elif "Received Store Response (Success)" in line and current is not None:
                done.append(current)
                current = None
        return done

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for storescu to exit; return its exit status."""
        assert self.proc is not None
        return int(self.proc.wait(timeout=timeout))
