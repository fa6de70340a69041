"""Typed errors raised by the storage layer.

Only the network edge (the SCP) maps these to DICOM status codes.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by :mod:`storage`."""


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
