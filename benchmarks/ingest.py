"""Ingest benchmark: 300 CT instances of 512x512 sent by dcmtk storescu to srnode, Orthanc and
dcmtk storescp, side by side in one run.

srnode answers success only after the file is fsynced and indexed; Orthanc runs with its default
``SyncStorageArea`` (fsync) and SQLite index; storescp just writes files.  The sender sets
TCP_NODELAY (dcmtk reads the ``TCP_NODELAY`` environment variable), and so do Orthanc
(``TcpNoDelay``) and srnode.  Prints a table and the ratios, writes JSON to
``benchmarks/results/ingest.json``.

``--console`` keeps srnode's web console open and refreshing while it receives: a thread loads
the dashboard, ``/api/jobs`` and ``/api/status`` every half second (a browser refreshes the
dashboard every 15 s), so the ratio shows what the console costs the SCP.

Usage: ``.venv/bin/python -m benchmarks.ingest [--instances 300] [--rounds 3] [--console]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from tests.support.dcmtk import StoreSCP, dcmtk_command
from tests.support.node import ServeProcess, node_config_dict, sample_file, write_toml
from tests.support.orthanc import OrthancServer

ROOT = Path(__file__).resolve().parents[1]


def make_series(out: Path, n: int) -> list[Path]:
    """``n`` 512x512 CT slices of one series (from pydicom-data's 693_UNCR.dcm, new UIDs)."""
    out.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(sample_file("693_UNCR.dcm"))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = src.pixel_array
    paths = []
    for i in range(n):
        ds = src.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [format_number_as_ds(-100.0), format_number_as_ds(-100.0),
                                   format_number_as_ds(float(i))]
        ds.PixelData = np.roll(pixels, i, axis=1).astype(pixels.dtype).tobytes()
        p = out / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


class NoopSCP:
    """pynetdicom accepting and discarding every instance: the floor of a Python DICOM stack."""

    def __init__(self) -> None:
        import socket as _socket

        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage

        from tests.support.dcmtk import free_port

        def on_store(event: evt.Event) -> int:
            event.encoded_dataset()
            return 0

        def on_open(event: evt.Event) -> None:
            event.assoc.dul.socket.socket.setsockopt(
                _socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)

        ae = AE("NOOP")
        ae.maximum_pdu_size = 1048576
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])

    def __enter__(self) -> NoopSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def fsync_latency_ms(folder: Path, size: int = 525_000, n: int = 50) -> float:
    """Median milliseconds to create, write and fsync a file of ``size`` bytes in ``folder``.

    Durable receivers pay this per instance, so it says how disk-bound the run was.
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fd = os.open(folder / f"probe{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def send(port: int, called: str, folder: Path) -> float:
    """Send every file of ``folder`` with storescu on one association; return seconds."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [dcmtk_command("storescu"), "-aet", "BENCH", "-aec", called, "+sd", "-R",
         "127.0.0.1", str(port), str(folder)], capture_output=True, text=True, env=env,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0 or "Store Failed" in r.stderr + r.stdout:
        raise RuntimeError(f"storescu to {called} failed:\n{r.stdout}\n{r.stderr}")
    return dt


class ConsoleLoad:
    """Loads console pages and API answers in a loop while the node receives."""

    PATHS = ("/console/", "/api/jobs", "/api/status")

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.port = port
        self.interval = interval
        self.loads = 0
        self.failures = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.PATHS:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                                timeout=30) as r:
                        r.read()
                    self.loads += 1
                except OSError as exc:
                    self.failures += 1
                    self.last_error = f"{path}: {exc}"
            self._stop.wait(self.interval)

    def __enter__(self) -> ConsoleLoad:
        from tests.support.dcmtk import wait_until_listening

        wait_until_listening(self.port, 60.0)  # HTTP starts just after the SCP
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/ingest.json, "
                    "ingest-console.json with --console)")
    ap.add_argument("--console", action="store_true",
                    help="load the console and API every 0.5 s while srnode receives")
    args = ap.parse_args()
    from tests.support.dcmtk import free_port

    results = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results / ("ingest-console.json" if args.console
                                          else "ingest.json"))
    console_loads = 0
    times: dict[str, list[float]] = {"srnode": [], "orthanc": [], "storescp": [],
                                     "pynetdicom-noop": []}
    with tempfile.TemporaryDirectory(prefix="srnode-bench-") as tmpdir:
        tmp = Path(tmpdir)
        files = make_series(tmp / "in", args.instances)
        mb = sum(p.stat().st_size for p in files) / 1e6
        fsync_ms = fsync_latency_ms(tmp / "probe")
        for rnd in range(args.rounds):
            # srnode: a real `srnode serve` process, durable and indexed, worker off
            work = tmp / f"srnode{rnd}"
            work.mkdir()
            data = node_config_dict(work, worker={"enabled": False},
                                    # a fixed port: at WARNING the node does not log the
                                    # port it bound
                                    node={"log_level": "WARNING", "port": free_port()},
                                    http={"port": free_port()})
            cfg = write_toml(data, work / "config.toml")
            with ServeProcess(cfg, data["node"]["port"], work / "serve.log"):
                if args.console:
                    with ConsoleLoad(data["http"]["port"]) as load:
                        times["srnode"].append(send(data["node"]["port"], "SRNODE", tmp / "in"))
                    if load.failures or not load.loads:
                        raise RuntimeError(f"console: {load.loads} loads, {load.failures} "
                                           f"failures, last {load.last_error}")
                    console_loads += load.loads
                else:
                    times["srnode"].append(send(data["node"]["port"], "SRNODE", tmp / "in"))
            # Orthanc (Debian package): TcpNoDelay, its largest PDU (128 KiB), default fsync
            with OrthancServer(tmp / f"orthanc{rnd}",
                               config_overrides={"MaximumPduLength": 131072}) as orthanc:
                times["orthanc"].append(send(orthanc.dicom_port, "ORTHANC", tmp / "in"))
            # dcmtk storescp: writes files, no index, no fsync
            with StoreSCP(tmp / f"storescp{rnd}") as scp:  # dcmtk caps its PDU at 128 KiB
                times["storescp"].append(send(scp.port, "STORESCP", tmp / "in"))
            # pynetdicom that discards everything: what the Python DICOM layer alone costs
            with NoopSCP() as noop:
                times["pynetdicom-noop"].append(send(noop.port, "NOOP", tmp / "in"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.instances} CT instances 512x512 ({mb:.0f} MB), storescu, median of "
          f"{args.rounds} rounds, {platform.node()} {os.cpu_count()} CPUs; create+write+fsync "
          f"of a 0.5 MB file: {fsync_ms:.2f} ms"
          + (f"; console loaded {console_loads} times while srnode received" if args.console
             else "") + "\n")
    print(f"{'receiver':<16} {'seconds':>8} {'inst/s':>8} {'MB/s':>7}   rounds")
    for k in ("srnode", "orthanc", "storescp", "pynetdicom-noop"):
        print(f"{k:<16} {med[k]:8.2f} {args.instances / med[k]:8.1f} {mb / med[k]:7.1f}   "
              + " ".join(f"{t:.2f}" for t in times[k]))
    ratios = {"srnode/orthanc": med["srnode"] / med["orthanc"],
              "srnode/storescp": med["srnode"] / med["storescp"],
              "pynetdicom-noop/orthanc": med["pynetdicom-noop"] / med["orthanc"]}
    for k, v in ratios.items():
        print(f"{k:<24} {v:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"instances": args.instances, "megabytes": mb, "rounds": times,
                               "median_seconds": med, "ratios": ratios,
                               "cpus": os.cpu_count(), "fsync_ms": fsync_ms,
                               "console_loads": console_loads if args.console else None},
                              indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
