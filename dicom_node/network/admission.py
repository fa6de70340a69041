"""Who gets a thread, a buffer and an association slot: the acceptor's connection budget.

A connection still negotiating (TLS handshake, A-ASSOCIATE-RQ not complete) costs the node a
thread and a little memory and gives nothing back, so it gets its own small budget, checked in
the accept thread before a thread is started: so many in all (``max_pending``), so many from one
source address (``max_pending_per_host``), and one deadline for the whole negotiation
(``acse_timeout``) that a reaper thread enforces by shutting the socket.  Only an accepted
association takes one of the ``max_associations`` slots, so idle or dripping peers can neither
exhaust memory nor keep senders out.

When the budget is full in all (a crowd from many addresses), the connection negotiating
longest is cut off to make room, provided it has been at it for more than
:data:`EVICTION_AGE` seconds (a real sender negotiates in milliseconds).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

#: Seconds a connection must have been negotiating before a newcomer may take its place.
EVICTION_AGE = 1.0
#: Most refusals reported (log line + audit entry) per second; the rest are counted.
REPORTS_PER_SECOND = 10


class StoppableAssociation(Protocol):
    """What :meth:`ConnectionBudget` needs of an association (see ``upper_layer.Association``)."""

    established: bool

    def abort_for_stop(self, force: bool) -> bool:
        """Abort for a node stop unless a message is in flight (always when ``force``)."""
        ...


@dataclass
class Connection:
    """Book-keeping of one open connection (accept thread, reaper and stop share it)."""

    address: str
    deadline: float
    started: float = field(default_factory=time.monotonic)
    association: StoppableAssociation | None = None
    negotiated: bool = False
    #: Cut off by the reaper (deadline) or to make room for a newcomer.
    expired: bool = False
    thread: threading.Thread | None = None


class ConnectionBudget:
    """The open connections of one acceptor and the limits they are held to.

    Parameters
    ----------
    max_pending
        Most connections negotiating at once.
    max_pending_per_host
        Most connections negotiating at once from one source address.
    max_associations
        Most established associations.
    acse_timeout
        Deadline in seconds for a connection's whole negotiation (0: none).
    report
        Called with ``(address, reason)`` for a connection refused by the budget (rate
        limited to :data:`REPORTS_PER_SECOND`; a suppressed count is added to the next).
    """

    def __init__(self, max_pending: int, max_pending_per_host: int, max_associations: int,
                 acse_timeout: float, report: Callable[[str, str], None]) -> None:
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        self.max_associations = max_associations
        self.acse_timeout = acse_timeout
        self.report = report
        self.lock = threading.Lock()
        self.open: dict[socket.socket, Connection] = {}
        self.stopping = threading.Event()
        self._reports: list[float] = []
        self._unreported = 0

    def _deadline(self, now: float) -> float:
        return now + (self.acse_timeout or 3600.0)

    def admit_connection(self, sock: socket.socket, address: str) -> bool:
        """Take a negotiating place for a new connection (accept thread; never blocks on I/O).

        Returns
        -------
        bool
            ``False``: close the connection at once (node stopping, or budget full).
        """
        reason = ""
        evicted: socket.socket | None = None
        now = time.monotonic()
        with self.lock:
            if self.stopping.is_set():
                reason = "node stopping"
            else:
                negotiating = [(s, c) for s, c in self.open.items() if not c.negotiated]
                if sum(1 for _, c in negotiating if c.address == address) >= \
                        self.max_pending_per_host:
                    reason = "too many connections negotiating from this address"
                elif len(negotiating) >= self.max_pending:
                    oldest_sock, oldest = min(negotiating, key=lambda sc: sc[1].started)
                    if now - oldest.started > EVICTION_AGE and not oldest.expired:
                        oldest.expired = True
                        evicted = oldest_sock
                    else:
                        reason = "too many connections negotiating"
            if not reason:
                self.open[sock] = Connection(address, self._deadline(now))
        if evicted is not None:
            with contextlib.suppress(OSError):
                evicted.shutdown(socket.SHUT_RDWR)
        if reason:
            self._report(address, reason)
        return not reason

    def _report(self, address: str, reason: str) -> None:
        now = time.monotonic()
        with self.lock:
            self._reports = [t for t in self._reports if now - t < 1.0]
            if len(self._reports) >= REPORTS_PER_SECOND:
                self._unreported += 1
                return
            self._reports.append(now)
            suppressed, self._unreported = self._unreported, 0
        if suppressed:
            reason = f"{reason} (and {suppressed} more connection(s) not reported)"
        with contextlib.suppress(Exception):
            self.report(address, reason)

    def connection(self, sock: socket.socket, address: str) -> Connection:
        """Return the record of ``sock`` (created for a connection not admitted before)."""
        with self.lock:
            conn = self.open.get(sock)
            if conn is None:
                conn = self.open[sock] = Connection(address, self._deadline(time.monotonic()))
            conn.thread = threading.current_thread()
            return conn

    def take_slot(self, sock: socket.socket) -> bool:
        """Move a negotiating connection to an association slot if one is free."""
        with self.lock:
            conn = self.open.get(sock)
            if conn is None or self.stopping.is_set():
                return False
            if sum(1 for c in self.open.values() if c.negotiated) >= self.max_associations:
                return False
            conn.negotiated = True
            return True

    def release(self, sock: socket.socket) -> None:
        """Forget a closed connection (its place and slot are free again)."""
        with self.lock:
            self.open.pop(sock, None)

    def count(self) -> int:
        """Connections open."""
        with self.lock:
            return len(self.open)

    def negotiated_count(self) -> int:
        """Associations established."""
        with self.lock:
            return sum(1 for c in self.open.values() if c.negotiated)

    def snapshot(self) -> list[tuple[socket.socket, Connection]]:
        """The open connections now."""
        with self.lock:
            return list(self.open.items())

    def reap_forever(self) -> None:
        """Cut off connections past their negotiation deadline until the node stops."""
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            with self.lock:
                late = [(s, c) for s, c in self.open.items()
                        if not c.negotiated and not c.expired and c.deadline <= now]
                for _, c in late:
                    c.expired = True
            for s, _ in late:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
