"""Start srnode pieces in the test process or as a real ``srnode serve`` subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.config import Config, parse_config
from tests.support.dcmtk import wait_until_listening

ROOT = Path(__file__).resolve().parents[2]
SERVING_PORT = re.compile(r"srnode serving AE \S* on port (\d+)")
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(pydicom.__file__).parent.parent / "data_store" / "data"


def sample_file(name: str) -> Path:
    """Path of a file shipped by pydicom or pydicom-data (never downloaded)."""
    for folder in (PYDICOM_FILES, PYDICOM_DATA):
        p = folder / name
        if p.exists():
            return p
    raise FileNotFoundError(name)


def node_config_dict(tmp: Path, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping for a node under ``tmp`` on a free port; ``sections`` override/add."""
    data: dict[str, Any] = {
        "node": {
            "ae_title": "SRNODE",
            "host": "127.0.0.1",
            # port 0: the node binds a free port and reports it (node.scp.port in process,
            # the "serving ... on port N" log line for `srnode serve`)
            "port": 0,
            "storage_dir": str(tmp / "storage"),
            "database_url": f"sqlite:///{tmp / 'srnode.db'}",
            "min_free_disk_mb": 1,
            "audit_log": str(tmp / "audit.log"),
            "log_file": str(tmp / "srnode.log"),
            "acse_timeout": 10.0,
            "dimse_timeout": 20.0,
            "network_timeout": 20.0,
        },
        "series": {"quiet_period_seconds": 1.0, "check_interval_seconds": 0.3},
        "worker": {"poll_interval_seconds": 0.2, "backoff_base_seconds": 1.0,
                   "heartbeat_seconds": 1.0, "lease_seconds": 10.0},
        # port 0: each test node binds a free port (read it from node.http.port)
        "http": {"port": 0},
        # no per-series adaptation unless a test asks for it (it costs [engine] adapt_seconds)
        "engine": {"adapt_seconds": 0.0},
    }
    for key, value in sections.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def node_config(tmp: Path, **sections: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` for a test node under ``tmp``."""
    return parse_config(node_config_dict(tmp, **sections))


@contextmanager
def running_node(config: Config, run_worker: bool = False) -> Iterator[Any]:
    """Run a :class:`dicom_node.app.Node` in this process (SCP + scheduler [+ worker])."""
    from dicom_node.app import Node

    node = Node(config, run_worker=run_worker)
    node.start()
    try:
        wait_until_listening(node.scp.port)
        yield node
    finally:
        node.stop()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(type(v))


def write_toml(data: Mapping[str, Any], path: Path) -> Path:
    """Write a config mapping as TOML (tables, arrays of tables, nested tls tables)."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            nested = {k: v for k, v in value.items() if isinstance(v, dict) and k == "tls"}
            for k, v in value.items():
                if k not in nested:
                    lines.append(f"{k} = {_toml_value(v)}")
            for k, v in nested.items():
                lines.append(f"[{key}.{k}]")
                lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        elif isinstance(value, list):
            for item in value:
                lines.append(f"[[{key}]]")
                for k, v in item.items():
                    if isinstance(v, dict) and k == "tls":
                        continue
                    lines.append(f"{k} = {_toml_value(v)}")
                if "tls" in item:
                    lines.append(f"[{key}.tls]")
                    lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in item["tls"].items())
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as fh:  # round-trip check
        tomllib.load(fh)
    return path


def srnode_executable() -> str:
    """The ``srnode`` console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "srnode"
    return str(exe) if exe.exists() else shutil.which("srnode") or "srnode"


class ServeProcess:
    """``srnode serve --config PATH`` as a real subprocess (for kill -9 and log tests)."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.configured_port = port
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _reported_port(self, offset: int) -> int | None:
        """The port named by the node's "serving ... on port N" line written after ``offset``."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return None
        found = SERVING_PORT.findall(text)
        return int(found[-1]) if found else None

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Start the process and wait until the SCP listens.

        With ``port`` 0 the node binds a free port; the bound port is read from its log line
        and stored in :attr:`port` (each start may get a different one).
        """
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [srnode_executable(), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"srnode serve exited early:\n{self.log_path.read_text()}")
            if self.configured_port == 0:
                reported = self._reported_port(offset)
                if reported is None:
                    time.sleep(0.05)
                    continue
                self.port = reported
            try:
                wait_until_listening(self.port, timeout=0.5)
                return self
            except Exception:  # noqa: BLE001
                continue
        raise TimeoutError(f"srnode serve did not listen:\n{self.log_path.read_text()}")

    def kill9(self) -> None:
        """SIGKILL the whole process group (the node and its job child processes)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mr8(tmp: Path) -> Path:
    """An 8-bit MR image (for the 8-bit-only JPEG processes)."""
    ds = pydicom.dcmread(sample_file("MR_small.dcm"))
    arr = ds.pixel_array.astype(np.float32)
    arr = np.clip(arr / max(1.0, float(arr.max())) * 255.0, 0, 255).astype(np.uint8)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "WindowCenter", "WindowWidth"):
        if kw in ds:
            del ds[kw]
    out = tmp / "mr8_explicit.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _dcmtk(tool: str, args: list[str], src: Path, dst: Path) -> Path:
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return dst


def transfer_syntax_variants(tmp: Path) -> dict[str, Path]:
    """One CT or MR Image Storage file per accepted transfer syntax.

    Uses pydicom's own files where one exists and dcmtk's encoders for the rest.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    mr8 = _mr8(tmp)
    out = {
        ExplicitVRLittleEndian: sample_file("CT_small.dcm"),
        ImplicitVRLittleEndian: sample_file("MR_small_implicit.dcm"),
        ExplicitVRBigEndian: sample_file("MR_small_bigendian.dcm"),
        RLELossless: sample_file("MR_small_RLE.dcm"),
        JPEGLSLossless: sample_file("MR_small_jpeg_ls_lossless.dcm"),
        JPEG2000Lossless: sample_file("MR_small_jp2klossless.dcm"),
        JPEG2000: sample_file("693_J2KI.dcm"),
        JPEGLosslessSV1: _dcmtk("dcmcjpeg", ["+e1"], sample_file("MR_small.dcm"), tmp / "sv1.dcm"),
        JPEGLossless: _dcmtk("dcmcjpeg", ["+el"], sample_file("MR_small.dcm"), tmp / "p14.dcm"),
        JPEGBaseline8Bit: _dcmtk("dcmcjpeg", ["+eb"], mr8, tmp / "baseline.dcm"),
        JPEGExtended12Bit: _dcmtk("dcmcjpeg", ["+ee"], mr8, tmp / "extended.dcm"),
        JPEGLSNearLossless: _dcmtk("dcmcjpls", ["+en"], mr8, tmp / "jlsn.dcm"),
        DeflatedExplicitVRLittleEndian: _dcmtk("dcmconv", ["+td"], sample_file("MR_small.dcm"),
                                               tmp / "deflate.dcm"),
    }
    for ts, path in out.items():
        got = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if got != ts:
            raise RuntimeError(f"{path.name}: expected {ts.name}, got {got.name}")
    return {str(k): v for k, v in out.items()}


def with_new_uids(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy a DICOM file with fresh Study/Series/SOP Instance UIDs (and optional changes)."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = changes.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = changes.pop("SeriesInstanceUID", generate_uid())
    ds.SOPInstanceUID = changes.pop("SOPInstanceUID", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst, enforce_file_format=True)
    return dst
