"""Typed errors raised by the storage layer.

Only the network edge (the SCP) maps these to DICOM status codes.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by :mod:`storage`."""


class StorageIOError(StorageError, OSError):
    """A file-system operation of the file store failed (disk full, permissions...).

    Also an :class:`OSError` carrying the original ``errno``, so callers may treat it as one.
    """

    def __str__(self) -> str:
        """Return the message without the ``[Errno N]`` prefix."""
        return str(self.strerror) if self.strerror else super().__str__()


class InvalidUIDError(StorageError, ValueError):
    """A UID is not a valid DICOM UID (PS3.5 9.1)."""


class InvalidInstanceError(StorageError, ValueError):
    """A dataset lacks attributes the node needs to store it."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or stays locked."""


class JobNotFoundError(StorageError, LookupError):
    """No job has the requested id."""


class InvalidJobStateError(StorageError):
    """A job is not in a state that allows the requested transition (or is not ours)."""
