"""Append-only audit log: who sent what, when, what was sent where, what was refused and why.

One JSON object per line.  Entries carry AE titles, addresses and DICOM UIDs, never patient
names, patient IDs or birth dates.  The file is opened in append mode for every entry
(``O_APPEND``), so concurrent writers in one process never interleave partial lines and nothing
already written is ever rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.log_safety import safe_fields

LOGGER = logging.getLogger(__name__)
#: Seconds between two log lines about failing audit writes (one per failure would flood).
_FAILURE_REPORT_INTERVAL = 60.0

_FORBIDDEN_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "PatientName",
                             "PatientID", "PatientBirthDate"})


class AuditLog:
    """Thread-safe append-only JSON-lines audit log.

    Parameters
    ----------
    path
        The log file; ``None`` or an empty string disables auditing.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._last_failure_report = float("-inf")
        #: Entries that could not be written (disk full, file system read-only).
        self.failed_writes = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        """Append one entry.

        Parameters
        ----------
        event
            Short event name, e.g. ``instance_received``, ``association_rejected``.
        **fields
            JSON-serialisable details (UIDs, AE titles, statuses, reasons).  String values are
            neutralised (:func:`dicom_node.log_safety.safe_fields`): invalid UIDs become a
            marker, control characters are escaped, lengths are bounded.

        A failing write (disk full, I/O error) is counted and logged at most once a minute; it
        never raises, so the DICOM answer that follows an audit entry is always sent.

        Raises
        ------
        ValueError
            If a field name is a patient identifier.
        """
        bad = _FORBIDDEN_KEYS.intersection(fields)
        if bad:
            raise ValueError(f"patient identifiers are not allowed in the audit log: {sorted(bad)}")
        if self.path is None:
            return
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        entry.update(safe_fields(fields))
        line = (json.dumps(entry, default=str, sort_keys=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.failed_writes += 1
                now = time.monotonic()
                if now - self._last_failure_report >= _FAILURE_REPORT_INTERVAL:
                    self._last_failure_report = now
                    LOGGER.error("cannot write the audit log %s (%s); %d entr%s lost so far",
                                 self.path, exc.strerror or exc, self.failed_writes,
                                 "y" if self.failed_writes == 1 else "ies")
