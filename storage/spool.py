"""A received data set written to a temporary file as it arrives, instead of held in memory.

The acceptor keeps small data sets in memory (the common, fast case) and moves a data set to a
:class:`Spool` once it grows past a threshold; from then on every fragment is appended to the
file.  The spool file lies in the store's spool folder under the temporary-file name pattern,
so a spool left by a killed process is removed at start-up like any other interrupted write,
and storing it is a rename (no copy): :meth:`Spool.to_pending` hands it over as a
:class:`storage.filestore.PendingWrite`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from pathlib import Path

from storage.errors import StorageIOError
from storage.filestore import SPOOL_DIR, TEMP_PREFIX, TEMP_SUFFIX, FileStore, PendingWrite

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Spool:
    """Bytes appended to a temporary file in the store's spool folder.

    Parameters
    ----------
    store
        The file store.
    initial
        Bytes received so far.

    Raises
    ------
    StorageIOError
        The file cannot be created or written (disk full).
    """

    def __init__(self, store: FileStore, initial: bytes | bytearray | memoryview = b"") -> None:
        self.store = store
        self.size = 0
        folder = store.root / SPOOL_DIR
        self.name: Path = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        try:
            try:
                self._fd: int | None = os.open(self.name, flags, 0o644)
            except FileNotFoundError:
                folder.mkdir(exist_ok=True)
                self._fd = os.open(self.name, flags, 0o644)
        except OSError as exc:
            raise StorageIOError(exc.errno, f"cannot create {self.name}: "
                                            f"{exc.strerror or exc}") from exc
        if initial:
            self.append(initial)

    def __len__(self) -> int:
        """Bytes written so far."""
        return self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the file.

        Raises
        ------
        StorageIOError
            Writing failed (the spool is discarded).
        """
        if self._fd is None:
            raise StorageIOError(0, "spool already handed over or discarded")
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self.discard()
            raise StorageIOError(exc.errno, f"cannot write {self.name}: "
                                            f"{exc.strerror or exc}") from exc
        self.size += written

    def view(self) -> mmap.mmap:
        """Map the file read-only (pages are read from disk only where they are looked at)."""
        if self._fd is None:
            raise StorageIOError(0, "spool already handed over or discarded")
        return mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)

    def to_pending(self) -> PendingWrite:
        """Hand the file over as a pending write (fsynced in the background, then renamed)."""
        if self._fd is None:
            raise StorageIOError(0, "spool already handed over or discarded")
        fd, self._fd = self._fd, None
        return PendingWrite.adopt(self.store, fd, self.name, self.size)

    def discard(self) -> None:
        """Close and remove the file (no-op once handed over or discarded)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.name)
