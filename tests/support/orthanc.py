"""A real Orthanc PACS for end-to-end tests, started from ``/usr/sbin/Orthanc`` on free ports.

Example
-------
>>> with OrthancServer(tmp_path / "orthanc", modalities={"SRNODE": ("SRNODE", "127.0.0.1", 11112)}
...                    ) as pacs:                                     # doctest: +SKIP
...     send_instances(Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port), paths, ...)
...     series_id = pacs.find_series(series_uid)
...     pacs.store_to_modality("SRNODE", [series_id])
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from tests.support.dcmtk import dcmtk_env, die_with_parent, free_port, wait_until_listening

__all__ = ["ORTHANC_BINARY", "OrthancError", "OrthancServer"]

ORTHANC_BINARY = "/usr/sbin/Orthanc"
_RUNNING: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


atexit.register(_kill_leftovers)


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class OrthancServer:
    """Orthanc with a fresh database and storage in ``workdir``, as a context manager.

    Parameters
    ----------
    workdir
        Holds the JSON configuration, the storage/index and the log (``orthanc.log``).
    aet
        Orthanc's DICOM AE title.
    modalities
        ``{name: (ae_title, host, port)}`` peers Orthanc may send to (``store_to_modality``).
    config_overrides
        Extra Orthanc configuration options merged into the generated configuration.
    graceful_stop
        ``True``: stop with SIGTERM (Orthanc needs about 3.5 s to shut down); ``False``
        (default): SIGKILL, instant, fine for a throw-away ``workdir`` (SQLite stays consistent).

    Attributes
    ----------
    dicom_port, http_port
        The loopback ports Orthanc listens on.
    url
        Base URL of the REST API.
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        config_overrides: dict[str, Any] | None = None,
        graceful_stop: bool = False,
    ) -> None:
        if not Path(ORTHANC_BINARY).exists() and shutil.which("Orthanc") is None:
            raise OrthancError(f"Orthanc is not installed at {ORTHANC_BINARY}")
        self.workdir = Path(workdir)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.config_overrides = dict(config_overrides or {})
        self.graceful_stop = graceful_stop
        self.dicom_port = 0
        self.http_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's log file."""
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration written to ``workdir/orthanc.json``."""
        cfg: dict[str, Any] = {
            "Name": f"srnode-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": True,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "OverwriteInstances": True,
        }
        cfg.update(self.config_overrides)
        return cfg

    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(3):  # a free port can be taken between choosing and binding it
            self.dicom_port, self.http_port = free_port(), free_port()
            while self.http_port == self.dicom_port:
                self.http_port = free_port()
            config_path = self.workdir / "orthanc.json"
            config_path.write_text(json.dumps(self.config(), indent=2))
            env = dcmtk_env()  # Orthanc's DICOM layer is dcmtk: disable Nagle there too
            log = self.log_path.open("ab")
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, "--no-jobs", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                preexec_fn=die_with_parent,
            )
            log.close()
            _RUNNING.add(self.process)
            try:
                self._wait_ready(30.0)
                return self
            except OrthancError as exc:
                last_error = str(exc)
                self.stop()
        raise OrthancError(f"Orthanc did not start: {last_error}\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        wait_until_listening(self.http_port, timeout, self.process)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode}")
            try:
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    wait_until_listening(
                        self.dicom_port, max(0.1, deadline - time.monotonic()), self.process
                    )
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise OrthancError(f"Orthanc REST API not answering after {timeout} s")

    def stop(self) -> None:
        """Stop Orthanc: SIGKILL, or with ``graceful_stop`` SIGTERM then SIGKILL after 15 s."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            if proc.poll() is None and not self.graceful_stop:
                proc.kill()
                proc.wait(10)
            elif proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            _RUNNING.discard(proc)

    def log(self) -> str:
        """Orthanc's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.session.close()

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        try:
            rsp = self.session.request(method, f"{self.url}{path}", **kwargs)
        except requests.RequestException as exc:
            raise OrthancError(f"{method} {path}: {exc}") from exc
        if not rsp.ok:
            raise OrthancError(f"{method} {path}: HTTP {rsp.status_code}: {rsp.text[:500]}")
        return rsp

    def get(self, path: str) -> Any:
        """GET a REST resource and return its JSON."""
        return self._request("GET", path).json()

    def post(self, path: str, body: Any) -> Any:
        """POST JSON (or bytes) to a REST resource and return its JSON answer."""
        if isinstance(body, bytes | bytearray):
            return self._request("POST", path, data=bytes(body)).json()
        return self._request("POST", path, json=body).json()

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality at run time (for peers that bind port 0)."""
        self._request("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def upload(self, path: Path) -> dict[str, Any]:
        """Upload one DICOM file over REST; returns the answer (``ID``, ``ParentSeries``...)."""
        result: dict[str, Any] = self.post("/instances", Path(path).read_bytes())
        return result

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        result: list[str] = self.get("/studies")
        return result

    def series(self) -> list[str]:
        """Orthanc IDs of all series."""
        result: list[str] = self.get("/series")
        return result

    def instances(self) -> list[str]:
        """Orthanc IDs of all instances."""
        result: list[str] = self.get("/instances")
        return result

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study (Orthanc's expanded series objects, with ``MainDicomTags``)."""
        result: list[dict[str, Any]] = self.get(f"/studies/{study_id}/series")
        return result

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        """The instances of a series (expanded objects with ``ID`` and ``MainDicomTags``)."""
        result: list[dict[str, Any]] = self.get(f"/series/{series_id}/instances")
        return result

    def instance_tags(self, instance_id: str, simplify: bool = True) -> dict[str, Any]:
        """Tags of an instance; ``simplify`` gives ``{keyword: value}``."""
        suffix = "simplified-tags" if simplify else "tags"
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/{suffix}")
        return result

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        return self._request("GET", f"/instances/{instance_id}/file").content

    def store_to_modality(
        self, modality_name: str, resource_ids: list[str], synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE resources (instance/series/study IDs) to a configured modality.

        Returns
        -------
        dict
            Orthanc's answer (for a synchronous job: counts of instances sent/failed).
        """
        body = {"Resources": list(resource_ids), "Synchronous": synchronous}
        result: dict[str, Any] = self.post(f"/modalities/{modality_name}/store", body)
        return result

    def echo_modality(self, modality_name: str) -> bool:
        """C-ECHO a configured modality; ``True`` on success."""
        try:
            self._request("POST", f"/modalities/{modality_name}/echo", json={})
        except OrthancError:
            return False
        return True

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Resources (``ID``, ``Type``) carrying a DICOM UID (study, series or SOP instance)."""
        result: list[dict[str, Any]] = self._request("POST", "/tools/lookup", data=uid).json()
        return result

    def find_series(self, series_instance_uid: str) -> str | None:
        """Orthanc ID of the series with this Series Instance UID, or ``None``."""
        for item in self.lookup(series_instance_uid):
            if item.get("Type") == "Series":
                return str(item["ID"])
        return None

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOP Instance UID, or ``None``."""
        for item in self.lookup(sop_instance_uid):
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until Orthanc holds at least ``count`` instances; returns their IDs.

        Raises
        ------
        OrthancError
            Fewer instances after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            ids = self.instances()
            if len(ids) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(ids) < count:
            raise OrthancError(f"{len(ids)} instance(s) after {timeout} s, expected {count}")
        return ids
