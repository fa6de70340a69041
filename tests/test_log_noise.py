"""Log noise (issue 12, item 15): rejected contexts summarised; decoder attempts not errors."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom.presentation import build_context

from dicom_node.derive.series import load_series
from dicom_node.network.scp import REJECTED_CONTEXTS_LOGGED, StorageSCP
from dicom_node.network.upper_layer import Peer
from tests.dicom_factory import make_ct_series
from tests.support.node import node_config


class _Audit:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))


def test_many_rejected_contexts_log_a_count_and_the_first_few(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = _Audit()
    scp = StorageSCP(node_config(tmp_path), None, None, audit)  # type: ignore[arg-type]
    rejected = []
    for i in range(120):
        cx = build_context(f"1.2.826.0.1.3680043.8.498.15.{i + 1}", ["1.2.840.10008.1.2"])
        cx.context_id = 2 * i + 1
        rejected.append(cx)
    peer = Peer(ae_title="STORESCU", address="127.0.0.1", port=1234, called_ae_title="SRNODE")
    with caplog.at_level(logging.INFO, logger="dicom_node.network.scp"):
        scp.on_accepted(peer, rejected)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    (line,) = warnings
    text = line.getMessage()
    assert "120 presentation context(s) rejected" in text
    assert text.count("1.2.826.0.1.3680043.8.498.15.") == REJECTED_CONTEXTS_LOGGED
    assert len(text) < 600
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dicom_node.network.scp"):
        scp.on_accepted(peer, rejected)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.count("1.2.826.0.1.3680043.8.498.15.") == 120 for m in debug)
    event, fields = audit.records[0]
    assert event == "contexts_rejected" and len(fields["contexts"]) == 120


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk not installed")
def test_12_bit_jpeg_extended_decodes_without_error_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One decoder plugin refusing 12-bit JPEG Extended is no error when another decodes it."""
    (path,) = make_ct_series(tmp_path / "raw", n_slices=1, rows=16)
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = np.clip(ds.pixel_array.astype(np.int32), 0, 4095).astype(np.uint16).tobytes()
    ds.save_as(path)
    out = tmp_path / "jpeg" / "CT0001.dcm"
    out.parent.mkdir()
    subprocess.run(["dcmcjpeg", "+ee", str(path), str(out)], check=True, timeout=60)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    with caplog.at_level(logging.DEBUG):
        series = load_series([out])
    assert series.volume.shape == (1, 16, 16)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]
