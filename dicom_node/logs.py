"""Logging set-up for the node.

srnode's own messages identify data by DICOM UIDs and AE titles only.  pynetdicom's debug
output can print data set contents, so its loggers are kept at WARNING unless the node runs at
DEBUG and ``allow_library_debug`` is set explicitly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dicom_node.log_safety import SafeFormatter

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", log_file: str | Path | None = None) -> None:
    """Configure the root logger for the node.

    Parameters
    ----------
    level
        Level name for srnode's loggers.
    log_file
        Optional file to append to in addition to standard error.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = SafeFormatter(FORMAT)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(formatter)
        root.addHandler(fh)
    root.setLevel(level.upper())
    # Library loggers: their debug output may contain data set elements.
    for name in ("pynetdicom", "apscheduler", "sqlalchemy", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pynetdicom quotes values received from peers (a "UID" or AE title may hold patient data,
    # or a forged line): SafeFormatter replaces quoted values in its records by a short hash.
    quiet_pydicom()


def quiet_pydicom() -> None:
    """Keep pydicom from echoing element values (which may be patient data) to logs or stderr.

    pydicom reports an invalid value by quoting it, both as a log record and as a warning.
    srnode validates what it needs itself and reports by attribute name, so reading stays
    lenient and silent here.
    """
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?")
