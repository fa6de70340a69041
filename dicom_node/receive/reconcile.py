"""Start-up reconciliation of the storage folder with the index.

A received file gets its final name just before the index transaction commits; a process
stopped (or killed) between the two leaves a complete file that the index does not know.  At
start-up every instance file (``<root>/<study>/<series>/<sop>.dcm``) that has no index row is
checked with the receive path's own checks: a complete, valid file is indexed (it was received
intact; the sender may or may not have had its answer), anything else is moved to
``<root>/quarantine/`` and reported in the log and the audit log.  No file is left unindexed
silently.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import AuditLog
from dicom_node.log_safety import is_valid_uid
from dicom_node.receive.header_scan import scan_instance
from dicom_node.receive.validation import check_image, parse_dataset
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import store_instance
from storage.models import Instance
from storage.records import InstanceHeader

LOGGER = logging.getLogger(__name__)

#: Folder under the storage root that holds files which could not be indexed.
QUARANTINE_DIR = "quarantine"
#: Calling AE title recorded for an instance indexed by reconciliation (sender unknown).
RECONCILED_AE_TITLE = "RECONCILED"


@dataclass
class ReconcileReport:
    """What :func:`reconcile_storage` did."""

    indexed: list[Path] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)


def _instance_files(root: Path) -> list[Path]:
    """Files laid out as ``<study>/<series>/<sop>.dcm`` with valid UIDs (others are not ours)."""
    found: list[Path] = []
    for study in os.scandir(root):
        if not study.is_dir(follow_symlinks=False) or not is_valid_uid(study.name):
            continue
        for series in os.scandir(study.path):
            if not series.is_dir(follow_symlinks=False) or not is_valid_uid(series.name):
                continue
            for entry in os.scandir(series.path):
                name = entry.name
                if (name.endswith(".dcm") and is_valid_uid(name[:-4])
                        and entry.is_file(follow_symlinks=False)):
                    found.append(Path(entry.path))
    return found


def _check_file(path: Path, data: bytes) -> InstanceHeader:
    """Return the header of a stored file if the receive path would have accepted it."""
    header = scan_instance(data)
    if header is None:
        ds = parse_dataset(data)
        header = InstanceHeader.from_dataset(ds)
        check_image(ds)
    parts = path.parts[-3:]
    if (header.study_instance_uid, header.series_instance_uid,
            f"{header.sop_instance_uid}.dcm") != tuple(parts):
        raise ValueError("UIDs in the file differ from its place in the storage folder")
    return header


def reconcile_storage(db: Database, store: FileStore, audit: AuditLog) -> ReconcileReport:
    """Index or quarantine every instance file the index does not know.

    Parameters
    ----------
    db
        The index database.
    store
        The file store.
    audit
        The audit log (``file_indexed_at_startup``, ``file_quarantined`` entries).

    Returns
    -------
    ReconcileReport
        The files indexed and the files moved to ``<root>/quarantine/``.
    """
    report = ReconcileReport()
    files = _instance_files(store.root)
    if not files:
        return report
    with db.session() as session:
        known = {os.path.normpath(p) for (p,) in session.execute(select(Instance.path))}
    for path in files:
        if os.path.normpath(path) in known:
            continue
        try:
            data = path.read_bytes()
            header = _check_file(path, data)
            store_instance(db, store, header, data, RECONCILED_AE_TITLE)
        except Exception as exc:  # noqa: BLE001 - anything that cannot be indexed is moved
            target = _quarantine(store.root, path)
            report.quarantined.append(target)
            LOGGER.warning("unindexed file %s could not be indexed (%s); moved to %s",
                           path.relative_to(store.root), type(exc).__name__, target)
            audit.record("file_quarantined", path=str(path.relative_to(store.root)),
                         moved_to=str(target.relative_to(store.root)),
                         reason=type(exc).__name__)
            continue
        report.indexed.append(path)
        LOGGER.warning("unindexed complete file %s found at start-up: indexed",
                       path.relative_to(store.root))
        audit.record("file_indexed_at_startup", sop_instance_uid=header.sop_instance_uid,
                     series_instance_uid=header.series_instance_uid,
                     study_instance_uid=header.study_instance_uid)
    return report


def _quarantine(root: Path, path: Path) -> Path:
    folder = root / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.parent.name}-{path.name}"
    os.replace(path, target)
    return target
