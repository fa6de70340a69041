"""Writing derived data sets as files (atomic: temporary file, fsync, rename, folder fsync)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from storage.filestore import FileStore, validate_uid


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write data sets as ``<SOPInstanceUID>.dcm`` files atomically (temp, fsync, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = FileStore(out_dir)
    paths = []
    for ds in datasets:
        path = out_dir / f"{validate_uid(str(ds.SOPInstanceUID))}.dcm"

        def _write(fh: Any, ds: Dataset = ds) -> None:
            ds.save_as(fh, enforce_file_format=True)

        store.write_atomic(path, _write)
        paths.append(path)
    return paths


#: Bytes read from the start of a derived file to find its reserved texts (the header; the
#: pixel data comes last).
HEADER_BYTES = 1 << 18


class IncompleteFileError(OSError):
    """A derived file lacks the reserved text it should have (changed since it was written)."""


def complete_series(paths: Sequence[Path], replacements: Mapping[bytes, bytes]) -> None:
    """Fill the reserved texts of written instances in place (same lengths), with fdatasync.

    A streamed series knows its series-level figures only after its last slab; its instances
    are written with reserved space for them (:class:`dicom_node.derive.builder.
    DerivedSeriesBuilder`), completed here before the series is published.

    Raises
    ------
    IncompleteFileError
        A file does not hold one of the reserved texts.
    """
    if not replacements:
        return
    for path in paths:
        with path.open("r+b") as fh:
            head = fh.read(HEADER_BYTES)
            for old, new in replacements.items():
                if len(old) != len(new):
                    raise ValueError("a replacement must keep the length")
                at = head.find(old)
                if at < 0:
                    raise IncompleteFileError(f"{path.name}: reserved text not found")
                fh.seek(at)
                fh.write(new)
            fh.flush()
            os.fdatasync(fh.fileno())  # same size, same blocks: the data is what must persist
