"""Read a file's header record the way the receive path builds it (test convenience)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.receive.header import header_from_dataset
from storage.errors import InvalidInstanceError
from storage.records import InstanceHeader


def read_header(source: bytes | Path) -> InstanceHeader:
    """Read the header of a DICOM file (Part 10, or a bare dataset without meta).

    Parameters
    ----------
    source
        The encoded file or dataset, or a path to it.

    Returns
    -------
    InstanceHeader
        The header.

    Raises
    ------
    InvalidInstanceError
        If the data cannot be parsed or lacks required attributes.
    InvalidUIDError
        If a required UID is malformed.
    """
    fp: Any = io.BytesIO(source) if isinstance(source, bytes | bytearray) else Path(source)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InvalidInstanceError(f"cannot parse DICOM data: {exc}") from exc
    return header_from_dataset(ds)
