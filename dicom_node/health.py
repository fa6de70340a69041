"""Health checks shared by ``GET /healthz`` and ``srnode status``.

A node is healthy when its SCP listens, the index answers, free disk is above
``[node] min_free_disk_mb`` and the engine's device is usable.  Free disk below
``[node] warn_free_disk_mb`` is reported as a warning (still healthy).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text

from dicom_node.config import Config
from storage.db import Database
from storage.errors import StorageError
from storage.filestore import FileStore

LOGGER = logging.getLogger(__name__)
_MB = 1024 * 1024


@dataclass
class Check:
    """The outcome of one health check."""

    ok: bool
    detail: str


@dataclass
class Health:
    """All checks of a node, and the warnings that do not make it unhealthy."""

    checks: dict[str, Check] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of ``/healthz``."""
        return {
            "status": "ok" if self.ok else "unhealthy",
            "failing": [name for name, c in self.checks.items() if not c.ok],
            "checks": {name: asdict(c) for name, c in self.checks.items()},
            "warnings": list(self.warnings),
        }


#: Resolves the device in a child process and prints ``{"device": ..., "problem": ...}``.
_RESOLVE_SCRIPT = """
import json, sys
from sr_engine.inference import resolve_device
device, fallback = resolve_device(sys.argv[1])
problem = fallback if sys.argv[1] == "cuda" and fallback else None
print(json.dumps({"device": device, "problem": problem}))
"""


class EngineDevice:
    """The engine's device, resolved in a child process (torch never loads in the SCP process).

    Resolved at start-up and again in the background when older than ``max_age_s``, so a GPU
    that disappears is noticed; until the first answer the status is "still checking".

    Parameters
    ----------
    requested
        ``[engine] device``: ``auto``, ``cpu`` or ``cuda``.
    max_age_s
        Seconds after which a status call triggers a fresh resolution.
    """

    def __init__(self, requested: str, max_age_s: float = 600.0) -> None:
        self.requested = requested
        self.max_age_s = max_age_s
        self._resolved: str | None = None
        self._problem: str | None = None
        self._checked_at = 0.0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> None:
        """Resolve in a daemon thread unless a resolution is running or recent."""
        with self._lock:
            fresh = self._done.is_set() and time.monotonic() - self._checked_at < self.max_age_s
            if self._running or fresh:
                return
            self._running = True
        threading.Thread(target=self._resolve, name="srnode-device", daemon=True).start()

    def _resolve(self) -> None:
        try:
            out = subprocess.run([sys.executable, "-c", _RESOLVE_SCRIPT, self.requested],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                resolved, problem = "none", f"the engine cannot start: {last[:300]}"
            else:
                answer = json.loads(out.stdout.strip().splitlines()[-1])
                resolved, problem = answer["device"], answer["problem"]
        except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            resolved, problem = "none", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._resolved, self._problem = resolved, problem
            self._checked_at = time.monotonic()
            self._running = False
        self._done.set()

    def status(self, wait: float = 30.0) -> tuple[str, str | None]:
        """Return ``(device, problem or None)``, waiting up to ``wait`` s for a first answer."""
        self.start()
        if not self._done.wait(wait):
            return "unknown", "still checking the engine device"
        with self._lock:
            return self._resolved or "none", self._problem

    def labels(self) -> tuple[str, str]:
        """``(requested, resolved)`` without waiting (``pending`` before the first answer)."""
        self.start()
        with self._lock:
            return self.requested, self._resolved or "pending"


def check_index(db: Database) -> Check:
    """Read from the index (a real table, not only ``SELECT 1``)."""
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar_one()
    except Exception as exc:  # noqa: BLE001 - any failure means the index does not answer
        return Check(False, f"index unavailable: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}")
    return Check(True, f"{db.backend} answers")


def check_disk(config: Config, store: FileStore, health: Health) -> Check:
    """Free disk against the refusal floor (and the warning threshold)."""
    node = config.node
    try:
        free_mb = store.free_bytes() // _MB
    except (OSError, StorageError) as exc:
        return Check(False, f"cannot stat storage: {exc}")
    if free_mb < node.min_free_disk_mb:
        return Check(False, f"{free_mb} MB free, below min_free_disk_mb {node.min_free_disk_mb}: "
                            "C-STORE answers 0xA700")
    if node.warn_free_disk_mb and free_mb < node.warn_free_disk_mb:
        health.warnings.append(f"free disk {free_mb} MB is below warn_free_disk_mb "
                               f"{node.warn_free_disk_mb} (refusals start at "
                               f"{node.min_free_disk_mb} MB)")
    return Check(True, f"{free_mb} MB free")


def check_health(config: Config, db: Database, store: FileStore,
                 scp_check: Callable[[], Check], device: EngineDevice,
                 device_wait: float = 30.0) -> Health:
    """Run every check.

    Parameters
    ----------
    config, db, store
        The node's configuration, index and file store.
    scp_check
        Whether the SCP listens (in-process: the server is up; ``srnode status``: a C-ECHO).
    device
        The engine device resolver.
    device_wait
        Seconds to wait for the device to be resolved.
    """
    health = Health()
    health.checks["scp"] = scp_check()
    health.checks["index"] = check_index(db)
    health.checks["disk"] = check_disk(config, store, health)
    resolved, problem = device.status(device_wait)
    health.checks["engine"] = Check(problem is None,
                                    problem or f"{device.requested} -> {resolved}")
    return health


def echo_check(config: Config, timeout: float = 5.0) -> Callable[[], Check]:
    """A check that the node's SCP answers C-ECHO (for ``srnode status``, another process)."""

    def _check() -> Check:
        from dicom_node.network.scu import DestinationUnavailableError, SendError, echo

        node = config.node
        host = "127.0.0.1" if node.host in ("0.0.0.0", "::", "") else node.host
        if node.tls.enabled:
            return Check(True, "TLS SCP: not echoed by srnode status")
        calling = (node.allowed_calling_ae_titles or [node.ae_title])[0]
        try:
            status = echo(node.ae_title, host, node.port, calling_ae_title=calling,
                          timeout=timeout)
        except (DestinationUnavailableError, SendError) as exc:
            try:  # rejected (e.g. this host is not allowed) but listening is still healthy
                socket.create_connection((host, node.port), timeout=timeout).close()
            except OSError:
                return Check(False, f"SCP {host}:{node.port} does not answer: {exc}")
            return Check(True, f"{host}:{node.port} listening (C-ECHO refused: {exc})")
        if status != 0:
            return Check(False, f"C-ECHO answered 0x{status:04X}")
        return Check(True, f"C-ECHO to {host}:{node.port} answered")

    return _check
