"""The file store: one DICOM Part 10 file per SOP Instance, written atomically.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Only validated
UIDs become path components, so a dataset cannot steer a write outside the root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from storage.errors import InvalidUIDError, StorageError, StorageIOError

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"
#: Folder under the root where received bytes are written before their final name is known.
SPOOL_DIR = ".incoming"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_WRITER: ThreadPoolExecutor | None = None
_WRITER_LOCK = threading.Lock()


def _writer() -> ThreadPoolExecutor:
    """Threads that write and fsync received files while the caller parses and indexes."""
    global _WRITER
    with _WRITER_LOCK:
        if _WRITER is None:
            _WRITER = ThreadPoolExecutor(max_workers=16, thread_name_prefix="srnode-write")
        return _WRITER


def validate_uid(uid: str) -> str:
    """Check a UID against PS3.5 section 9.1 and return it unchanged.

    Parameters
    ----------
    uid
        The UID, without padding.

    Returns
    -------
    str
        ``uid`` itself.

    Raises
    ------
    InvalidUIDError
        If ``uid`` is not a string, is empty, longer than 64 characters, contains anything but
        digits and dots, has an empty component or a component with a leading zero.
    """
    if not isinstance(uid, str):
        raise InvalidUIDError(f"UID must be a string, got {type(uid).__name__}")
    if not uid:
        raise InvalidUIDError("UID is empty")
    if len(uid) > 64:
        raise InvalidUIDError(f"UID is {len(uid)} characters long (at most 64 allowed)")
    if not _UID_RE.match(uid):
        # The value itself is not quoted: a sender may have built it from patient data.
        raise InvalidUIDError(
            f"UID ({len(uid)} characters) is not digits and dots with non-empty components "
            "without leading zeros"
        )
    return uid


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry to disk (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PendingWrite:
    """A file being written and fsynced in the background under a temporary name.

    Created by :meth:`FileStore.begin_write`; :meth:`commit` gives it its final name (atomic
    rename, then the folder is fsynced), :meth:`discard` removes it.  One of the two must be
    called; both are idempotent once the file is committed or discarded.
    """

    def __init__(self, store: FileStore, data: bytes | bytearray | memoryview) -> None:
        self.store = store
        self.size = len(data)
        self._state = "pending"  # -> "committed" or "discarded"
        # Creating and writing the file is quick (page cache); only the fsync, which waits for
        # the disk, runs in the helper thread.  Creation errors (disk full) raise here.
        spool = store.root / SPOOL_DIR
        name = spool / f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        try:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
            except FileNotFoundError:
                spool.mkdir(exist_ok=True)
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageIOError(
                exc.errno, f"cannot create a temporary file in {spool}: {exc.strerror or exc}"
            ) from exc
        try:
            view = memoryview(data).cast("B")
            written = 0
            while written < self.size:
                written += os.write(fd, view[written:])
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise StorageIOError(exc.errno, f"cannot write {name}: {exc.strerror or exc}") from exc
        self._future: Future[Path] = _writer().submit(self._sync, fd, name)

    @classmethod
    def adopt(cls, store: FileStore, fd: int, name: Path, size: int) -> PendingWrite:
        """A pending write whose bytes are already in the temporary file ``name``.

        Used for data sets spooled to disk as they arrived (:class:`storage.spool.Spool`).

        Parameters
        ----------
        store
            The file store (``name`` lies in its spool folder).
        fd
            Open descriptor of ``name``; closed by this object after the fsync.
        name
            The temporary file.
        size
            Bytes in it.

        Returns
        -------
        PendingWrite
            Being fsynced in the background; commit or discard it as any other.
        """
        self = cls.__new__(cls)
        self.store = store
        self.size = size
        self._state = "pending"
        self._future = _writer().submit(cls._sync, fd, name)
        return self

    @staticmethod
    def _sync(fd: int, name: Path) -> Path:
        try:
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise StorageIOError(exc.errno, f"cannot write {name}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        return name

    def commit(self, path: Path) -> int:
        """Wait until the bytes are on disk, move them to ``path`` and fsync its folder.

        Returns
        -------
        int
            Bytes written.

        Raises
        ------
        StorageIOError
            Writing or renaming failed (the temporary file is removed).
        StorageError
            ``path`` is outside the root, or the write was already committed or discarded.
        """
        if self._state != "pending":
            raise StorageError(f"pending write already {self._state}")
        try:
            path = self.store.check_inside(path)
        except StorageError:
            self.discard()
            raise
        tmp = self._future.result()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            self.discard()
            raise StorageIOError(exc.errno, f"cannot store {path}: {exc.strerror or exc}") from exc
        self._state = "committed"
        _fsync_dir(path.parent)
        return self.size

    @property
    def committed(self) -> bool:
        """Whether :meth:`commit` has moved the file to its final name."""
        return self._state == "committed"

    def discard(self) -> None:
        """Remove the temporary file (no-op once committed or discarded)."""
        if self._state != "pending":
            return
        self._state = "discarded"
        try:
            tmp = self._future.result()
        except Exception:  # noqa: BLE001 - the failed write left nothing behind
            return
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class FileStore:
    """Stores received instances under one root folder.

    Parameters
    ----------
    root
        Root folder; created when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageIOError(
                exc.errno, f"cannot create storage root {self.root}: {exc.strerror or exc}"
            ) from exc

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Return where the instance with these UIDs is stored.

        Parameters
        ----------
        study_uid, series_uid, sop_uid
            Study Instance UID, Series Instance UID and SOP Instance UID.

        Returns
        -------
        Path
            ``root/<study>/<series>/<sop>.dcm``.

        Raises
        ------
        InvalidUIDError
            If any UID is invalid.
        """
        parts = [validate_uid(study_uid), validate_uid(series_uid), validate_uid(sop_uid)]
        path = self.root / parts[0] / parts[1] / f"{parts[2]}.dcm"
        if not path.is_relative_to(self.root):  # pragma: no cover - validation forbids it
            raise InvalidUIDError("instance path escapes the storage root")
        return path

    def write_atomic(self, path: Path, data: bytes | Callable[[BinaryIO], None]) -> int:
        """Write a file so that ``path`` holds either the old or the complete new content.

        The content goes to a temporary file in the same folder, is flushed and fsynced, then
        renamed over ``path`` with :func:`os.replace`, and the folder is fsynced.

        Parameters
        ----------
        path
            Destination; must lie under the store root. Parent folders are created.
        data
            The bytes, or a callable writing them to the binary file object it is given.

        Returns
        -------
        int
            Bytes written.

        Raises
        ------
        StorageIOError
            On a file-system error (also an ``OSError`` with the original errno).
        StorageError
            If ``path`` is outside the root.
        Exception
            Whatever the writer callable raises; the temporary file is removed first.
        """
        path = self.check_inside(path)
        directory = path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                prefix=TEMP_PREFIX + path.name + ".", suffix=TEMP_SUFFIX, dir=directory
            )
        except OSError as exc:
            raise StorageIOError(
                exc.errno, f"cannot create a temporary file in {directory}: {exc.strerror or exc}"
            ) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    fh.write(data)
                else:
                    data(fh)
                fh.flush()
                os.fsync(fh.fileno())
                size = os.fstat(fh.fileno()).st_size
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise StorageIOError(
                    exc.errno, f"cannot write {path}: {exc.strerror or exc}"
                ) from exc
            raise
        _fsync_dir(directory)
        return size

    def check_inside(self, path: Path) -> Path:
        """Return ``path`` if it resolves to a place under the root, else raise StorageError."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root):
            raise StorageError(f"{path} is outside the storage root")
        return path

    def begin_write(self, data: bytes | bytearray | memoryview) -> PendingWrite:
        """Start writing received bytes (temporary name, fsync) in a background thread.

        The caller parses and indexes meanwhile and then calls :meth:`PendingWrite.commit`
        with the final path (or :meth:`PendingWrite.discard`).
        """
        return PendingWrite(self, data)

    def free_bytes(self) -> int:
        """Return the bytes available to this process on the root's file system."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError as exc:
            raise StorageIOError(
                exc.errno, f"cannot stat {self.root}: {exc.strerror or exc}"
            ) from exc

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files left by an interrupted write (call at start-up).

        Returns
        -------
        int
            Number of files removed.
        """
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed
