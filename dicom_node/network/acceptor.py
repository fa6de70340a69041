"""The acceptor: a threading TCP server that admits connections within the budgets.

Each admitted connection runs as an :class:`~dicom_node.network.upper_layer.Association` on its
own thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time

from dicom_node.log_safety import safe_text
from dicom_node.network.admission import ConnectionBudget
from dicom_node.network.service import AcceptorPolicy, StorageService
from dicom_node.network.upper_layer import Association

LOGGER = logging.getLogger(__name__)


class _Handler(socketserver.BaseRequestHandler):
    server: StorageAcceptor

    def handle(self) -> None:
        self.server.handle_connection(self.request, self.client_address)


class StorageAcceptor(socketserver.ThreadingTCPServer):
    """Listens for associations; one thread per association.

    Connections still negotiating have their own small budget and a deadline, and only an
    accepted association takes one of the ``policy.max_associations`` slots
    (:class:`dicom_node.network.admission.ConnectionBudget`).

    Parameters
    ----------
    address
        ``(host, port)`` to bind (port 0: any free port).
    policy
        Who may associate and how.
    service
        Receives C-ECHO and C-STORE requests.
    ssl_context
        Server-side TLS context (``None``: plain TCP).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy,
                 service: StorageService, ssl_context: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.policy = policy
        self.service = service
        self.ssl_context = ssl_context
        self.budget = ConnectionBudget(policy.max_pending, policy.max_pending_per_host,
                                       policy.max_associations, policy.acse_timeout,
                                       self._report_refused)
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None

    def active_count(self) -> int:
        """Connections currently open."""
        return self.budget.count()

    def negotiated_count(self) -> int:
        """Associations currently established (the ones ``max_associations`` counts)."""
        return self.budget.negotiated_count()

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int] | str) -> bool:
        """Admit a new connection to the negotiating budget (accept thread).

        Returns
        -------
        bool
            ``False`` closes the connection at once.
        """
        assert isinstance(request, socket.socket)
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        return self.budget.admit_connection(request, host)

    def _report_refused(self, host: str, reason: str) -> None:
        LOGGER.warning("connection from %s closed before negotiation: %s", host, reason)
        self.service.on_negotiation_failed(host, f"connection refused: {reason}", None)

    # -- one connection -----------------------------------------------------------------------
    def handle_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Run one association on the calling thread (socketserver's per-connection thread)."""
        conn = self.budget.connection(sock, str(address[0]))
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wrapped = sock
            if self.ssl_context is not None:
                sock.settimeout(self.policy.acse_timeout or None)
                try:
                    wrapped = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    why = "deadline passed" if conn.expired else safe_text(str(exc), 200)
                    LOGGER.warning("TLS handshake with %s failed: %s", address[0], why)
                    with contextlib.suppress(Exception):
                        self.service.on_negotiation_failed(
                            str(address[0]), f"TLS handshake failed: {why}", None)
                    return
            association = Association(
                wrapped, (str(address[0]), int(address[1])), self.policy, self.service,
                self.active_count, admit=lambda: self.budget.take_slot(sock),
                stopping=self.budget.stopping)
            with self.budget.lock:
                conn.association = association
            association.run()
            if wrapped is not sock:
                with contextlib.suppress(OSError, ssl.SSLError):
                    wrapped.close()
        finally:
            self.budget.release(sock)

    def start(self) -> None:
        """Serve in a background thread (and the negotiation reaper in another)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="srnode-scp", daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self.budget.reap_forever, name="srnode-scp-reaper",
                                        daemon=True)
        self._reaper.start()

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let messages in flight finish for ``grace`` seconds, abort the rest.

        Connections still negotiating are closed at once; established associations between
        messages get an A-ABORT at once; an association receiving or storing a message is
        aborted right after its answer is sent, or when ``grace`` runs out.

        Parameters
        ----------
        grace
            Seconds to wait for messages in flight (0: abort everything now).
        """
        self.budget.stopping.set()
        self.shutdown()  # no new connections are accepted once this returns
        self.server_close()  # the listening socket: later connection attempts are refused
        deadline = time.monotonic() + max(0.0, grace)
        while True:
            conns = self.budget.snapshot()
            force = time.monotonic() >= deadline
            busy = 0
            for sock, conn in conns:
                if conn.association is None or not conn.association.established:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                elif not conn.association.abort_for_stop(force):
                    busy += 1
            if not busy or force:
                break
            time.sleep(0.05)
        # Give the association threads a moment to finish what they were doing (an index
        # commit under way) before the caller closes the database.
        end = time.monotonic() + 5.0
        for _, conn in conns:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(max(0.0, end - time.monotonic()))
