"""Writing derived data sets as files (atomic: temporary file, fsync, rename, folder fsync)."""

from __future__ import annotations

from collections.abc import Sequence
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
