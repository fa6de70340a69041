"""The data set of one C-STORE while its fragments arrive: bounded memory whatever the peer sends.

- Fragments of 64 KiB and more are kept as views of the PDU buffers they arrived in (no copy);
  smaller ones are merged into one growing buffer, so a stream of tiny fragments costs their
  bytes, not an object each.
- Past ``spool_threshold`` bytes everything goes to a spool file (:class:`storage.spool.Spool`)
  and later fragments are appended there: memory per association stays below the threshold.
- Past ``max_bytes`` (``[node] max_instance_mb``) the data set is dropped and the rest is only
  counted; the C-STORE is then answered with ``statuses.INSTANCE_TOO_LARGE``.
"""

from __future__ import annotations

from collections.abc import Callable

from dicom_node.network import statuses
from storage.spool import Spool

#: Fragments shorter than this are copied into a merged buffer instead of kept as views.
SMALL_FRAGMENT = 64 << 10


class DataSetBuffer:
    """Collects the fragments of one data set.

    Parameters
    ----------
    prefix
        Bytes that come first (the Part 10 preamble and file meta), or ``None`` to count the
        fragments without keeping them (a data set nobody will store).
    max_bytes
        Largest data set kept (0: no limit); the prefix does not count.
    spool_threshold
        Size from which the data is moved to a spool file (0: never).
    open_spool
        Returns an empty spool file, or ``None`` to keep the data set in memory; an
        :class:`OSError` (disk full) drops the data set with ``statuses.OUT_OF_RESOURCES``.
    """

    def __init__(self, prefix: bytes | None, max_bytes: int, spool_threshold: int,
                 open_spool: Callable[[], Spool | None]) -> None:
        self.max_bytes = max_bytes
        self.spool_threshold = spool_threshold
        self.open_spool = open_spool
        self.parts: list[bytes | bytearray | memoryview] | None = (
            [prefix] if prefix is not None else None)
        self.kept = len(prefix) if prefix is not None else 0
        #: Data set bytes received (kept or not).
        self.received = 0
        #: ``(status, reason)`` once the data set was dropped; ``None`` while it is kept.
        self.dropped: tuple[int, str] | None = None
        self.spool: Spool | None = None
        self._spool_tried = False

    def add(self, value: memoryview) -> None:
        """Add one fragment (never raises: problems drop the data set)."""
        self.received += len(value)
        if self.parts is None and self.spool is None:
            return
        if self.max_bytes and self.received > self.max_bytes:
            self._drop(statuses.INSTANCE_TOO_LARGE,
                       f"data set of more than {self.max_bytes} bytes "
                       f"(max_instance_mb {self.max_bytes // (1024 * 1024)})")
            return
        if self.spool is not None:
            try:
                self.spool.append(value)
            except OSError as exc:
                self.spool = None  # it discarded itself
                self._drop(statuses.OUT_OF_RESOURCES,
                           f"cannot write the spool file: {exc.strerror or exc}")
            return
        assert self.parts is not None
        if len(value) < SMALL_FRAGMENT:
            last = self.parts[-1]
            if isinstance(last, bytearray):
                last += value
            else:
                self.parts.append(bytearray(value))
        else:
            self.parts.append(value)
        self.kept += len(value)
        if self.spool_threshold and self.kept > self.spool_threshold and not self._spool_tried:
            self._spool_tried = True
            self._move_to_spool()

    def _move_to_spool(self) -> None:
        assert self.parts is not None
        try:
            spool = self.open_spool()
            if spool is None:
                return
            self.spool = spool
            for part in self.parts:
                spool.append(part)
        except OSError as exc:
            if self.spool is not None:
                self.spool.discard()
                self.spool = None
            self._drop(statuses.OUT_OF_RESOURCES,
                       f"cannot write the spool file: {exc.strerror or exc}")
            return
        self.parts = None

    def _drop(self, status: int, reason: str) -> None:
        self.discard()
        self.dropped = (status, reason)

    def take(self) -> bytes | Spool | None:
        """Hand the complete data set over: bytes, a spool file (now the caller's) or ``None``.

        ``None`` when it was dropped or never kept.
        """
        if self.spool is not None:
            spool, self.spool = self.spool, None
            return spool
        if self.parts is None:
            return None
        data = b"".join(self.parts)
        self.parts = None
        return data

    def discard(self) -> None:
        """Free the memory and remove the spool file, if any."""
        self.parts = None
        if self.spool is not None:
            self.spool.discard()
            self.spool = None
