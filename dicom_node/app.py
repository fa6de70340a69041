"""The running node: SCP + completeness scheduler + worker loop, started and stopped together."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.index import open_index, redact_url
from dicom_node.network.scp import StorageSCP
from dicom_node.receive.reconcile import reconcile_storage
from storage.completeness import CompletenessScheduler
from storage.filestore import FileStore

LOGGER = logging.getLogger(__name__)


#: GIL switch interval of a receiving node (seconds); see :meth:`Node.start`.
RECEIVE_SWITCH_INTERVAL_S = 0.0005


class Node:
    """One srnode process.

    Parameters
    ----------
    config
        The validated configuration.
    run_worker
        Start the worker loop (``[worker] enabled`` decides when ``None``).
    receive
        Start the SCP and the completeness scheduler (``False`` for a worker-only process on
        another machine that shares the PostgreSQL queue and the storage folder).
    """

    def __init__(
        self, config: Config, run_worker: bool | None = None, receive: bool = True
    ) -> None:
        self.config = config
        Path(config.node.storage_dir).mkdir(parents=True, exist_ok=True)
        self.db = open_index(config, migrate=True)
        self.store = FileStore(Path(config.node.storage_dir))
        self.audit = AuditLog(config.node.audit_log or None)
        self.scp = StorageSCP(config, self.db, self.store, self.audit)
        self.scheduler = CompletenessScheduler(
            self.db,
            config.rules,
            default_quiet_period=config.series.quiet_period_seconds,
            max_age=config.series.max_age_seconds,
            interval_seconds=config.series.check_interval_seconds,
            max_attempts=config.worker.max_attempts,
            receiving=self.scp.receiving_series,
        )
        self.run_worker = config.worker.enabled if run_worker is None else run_worker
        self.receive = receive
        if receive and config.http.enabled:
            from dicom_node.http_server import check_exposure

            check_exposure(config.http)
        self.http = None
        self.console = None
        self.housekeeping = None
        self.worker = None
        self._worker_thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Start receiving, the completeness check and (if enabled) the worker."""
        if self.receive:
            # Each association is one thread that hands the disk work to a writer thread and
            # waits for it; with Python's default 5 ms GIL switch interval a thread coming back
            # from fsync can wait that long behind a parsing thread.  0.5 ms measured 20-25 %
            # faster receiving (benchmarks/ingest.py); the SR work runs in child processes.
            sys.setswitchinterval(RECEIVE_SWITCH_INTERVAL_S)
            removed = self.store.remove_stale_temp_files()
            if removed:
                LOGGER.info("removed %d incomplete temporary file(s) from an earlier run", removed)
            report = reconcile_storage(self.db, self.store, self.audit)
            if report.indexed or report.quarantined:
                LOGGER.warning("storage reconciled with the index: %d file(s) indexed, %d moved "
                               "to quarantine", len(report.indexed), len(report.quarantined))
            self.scp.start()
            self.scheduler.start()
            try:
                self._start_operations()
            except BaseException:
                self.stop()
                raise
        if self.run_worker:
            from dicom_node.worker import Worker

            self.worker = Worker(self.config, self.db, self.store, self.audit)
            self._worker_thread = threading.Thread(
                target=self.worker.run_forever, args=(self._stop,), name="srnode-worker",
                daemon=True,
            )
            self._worker_thread.start()
        if self.receive and not self.config.rules:
            LOGGER.warning("no [[rules]] configured: series are received and indexed, not queued")

    def _start_operations(self) -> None:
        """Start retention on the scheduler and (``[http] enabled``) the HTTP server.

        The HTTP server answers /healthz, /metrics, the REST API and the console.
        """
        from dicom_node.health import Check, EngineDevice, Health, check_health
        from dicom_node.housekeeping import Housekeeping

        self.housekeeping = Housekeeping(self.config, self.db, self.store, self.audit)
        self.housekeeping.start()
        if not self.config.http.enabled:
            return
        from dicom_node.console.api import Console
        from dicom_node.http_server import HttpServer, build_app
        from dicom_node.metrics import IndexCollector, build_registry

        # resolved in a child process on the first /healthz or /metrics request
        device = EngineDevice(self.config.engine.device)

        def scp_check() -> Check:
            listening = self.scp.listening
            return Check(listening, f"listening on port {self.scp.port}" if listening
                         else "SCP not listening")

        def health() -> Health:
            return check_health(self.config, self.db, self.store, scp_check, device)

        registry = build_registry(IndexCollector(self.db, self.store, device.labels))
        self.console = Console(self.config, self.db, self.audit, health)
        self.http = HttpServer(self.config.http,
                               build_app(health, registry, self.config.http.token, self.console))
        self.http.start()

    def stop(self) -> None:
        """Stop everything; running jobs are left to be resumed (their lease expires)."""
        self._stop.set()
        if self.receive:
            self.scp.stop()
            self.scheduler.shutdown()
        if self.http is not None:
            self.http.stop()
        if self.console is not None:
            self.console.close()
        if self.housekeeping is not None:
            self.housekeeping.shutdown()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=30)
        self.db.dispose()


def serve(config: Config, receive: bool = True) -> int:
    """Run the node until SIGINT or SIGTERM.

    Parameters
    ----------
    config
        The configuration.
    receive
        ``False`` runs the worker loop only (``srnode worker``).

    Returns
    -------
    int
        Process exit status.
    """
    node = Node(config, run_worker=True if not receive else None, receive=receive)
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("signal %d received, stopping", signum)
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    node.start()
    if receive:
        LOGGER.info(
            "srnode serving AE %s on port %d; database %s; storage %s",
            config.node.ae_title, node.scp.port, redact_url(config.node.database_url),
            config.node.storage_dir,
        )
    else:
        LOGGER.info("srnode worker %s polling %s", node.worker.worker_id if node.worker else "",
                    redact_url(config.node.database_url))
    try:
        while not done.wait(1.0):
            pass
    finally:
        node.stop()
    return 0
