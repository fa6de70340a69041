"""Peak resident memory of ``srnode enhance`` and of the worker child of ``srnode serve``.

Peak RSS as the operating system reports it, never extrapolated and never from tracemalloc:

- ``srnode enhance`` runs under ``/usr/bin/time -v`` ("Maximum resident set size").
- the worker child (the spawned process that derives and sends one job) is watched through
  ``/proc/<pid>/status``: ``VmHWM``, the kernel's high-water mark of its resident set, read
  until the child exits.

Series: ``N`` CT slices of 512x512 (:func:`benchmarks.ingest.make_series`), slice mode x2 with
``fast``; and a 150-slice series in volume mode x4 (600 output slices, self-ensemble on, as by
default; per-series adaptation off).  Inputs are generated once under ``--inputs``.

Prints a table and writes JSON to ``benchmarks/results/memory.json``.

Usage: ``python -m benchmarks.memory [--slices 100 300 600 1500] [--volume 150]
[--which enhance worker]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOALS_MB = {"slice": 1536.0, "volume": 2048.0}


def _inputs(folder: Path, n: int) -> Path:
    """``n`` CT slices of 512x512 under ``folder/ct<n>`` (made once)."""
    from benchmarks.ingest import make_series

    out = folder / f"ct{n}"
    done = folder / f"ct{n}.complete"
    if (out / ".complete").exists():  # marker of an earlier version of this script
        (out / ".complete").rename(done)
    if not done.exists():
        make_series(out, n)
        done.write_text("")
    return out


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


def _config(work: Path, mode: str, budget: float | None) -> dict[str, Any]:
    from tests.support.node import node_config_dict

    engine: dict[str, Any] = {"adapt_seconds": 0.0}
    if budget is not None:
        engine["memory_budget_mb"] = budget
    return node_config_dict(work, engine=engine)


def measure_enhance(src: Path, mode: str, scale: int, work: Path,
                    budget: float | None) -> dict[str, Any]:
    """Run ``srnode enhance`` under ``/usr/bin/time -v``; return peak RSS and seconds."""
    from tests.support.node import write_toml

    cfg = write_toml(_config(work, mode, budget), work / "config.toml")
    out = work / "out"
    timing = work / "time.txt"
    cmd = ["/usr/bin/time", "-v", "-o", str(timing), sys.executable, "-c",
           "import sys; from dicom_node.cli import main; sys.exit(main())",
           "enhance", str(src), str(out), "--config", str(cfg), "--mode", mode,
           "--scale", str(scale), "--model", "fast", "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"srnode enhance failed:\n{r.stdout}\n{r.stderr}")
    text = timing.read_text()
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    files = sum(1 for _ in out.rglob("*.dcm"))
    return {"peak_rss_mb": kb / 1024, "seconds": seconds, "instances": files}


def _job_child(serve_pid: int) -> int | None:
    """PID of the job child process of ``srnode serve`` (spawned by multiprocessing)."""
    children: list[str] = []
    for task in Path(f"/proc/{serve_pid}/task").glob("*"):  # the worker thread's children
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            return int(pid)
    return None


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) if m else None


def measure_worker(src: Path, mode: str, scale: int, work: Path,
                   budget: float | None, timeout: float = 7200.0) -> dict[str, Any]:
    """Send ``src`` to a real ``srnode serve``; return the job child's peak RSS (VmHWM)."""
    from benchmarks.end_to_end import send_series, wait_done
    from benchmarks.ingest import NoopSCP
    from storage.db import Database
    from storage.jobs import JobQueue
    from tests.support.node import ServeProcess, write_toml

    with NoopSCP() as pacs:
        data = _config(work, mode, budget)
        data["series"] = {"quiet_period_seconds": 1.0, "check_interval_seconds": 0.2}
        data["worker"] = {**data["worker"], "job_timeout_seconds": timeout,
                          "lease_seconds": 120.0, "heartbeat_seconds": 5.0}
        data["destinations"] = [{"name": "pacs", "ae_title": "NOOP", "host": "127.0.0.1",
                                 "port": pacs.port}]
        data["rules"] = [{"name": "r", "modalities": ["CT"], "mode": mode, "scale": scale,
                          "model": "fast", "destinations": ["pacs"]}]
        cfg = write_toml(data, work / "config.toml")
        with ServeProcess(cfg, data["node"]["port"], work / "serve.log") as serve:
            assert serve.proc is not None
            send_series(serve.port, src)
            peak = 0
            child: int | None = None
            db = Database(data["node"]["database_url"])
            queue = JobQueue(db)
            t0 = time.perf_counter()
            try:
                while time.perf_counter() - t0 < timeout:
                    pid = _job_child(serve.proc.pid)
                    if pid is not None:
                        child = pid
                    if child is not None:
                        kb = _vm_hwm_kb(child)
                        if kb is not None:
                            peak = max(peak, kb)
                    jobs = queue.list_jobs()
                    if jobs and jobs[0]["state"] in ("done", "failed", "held"):
                        break
                    time.sleep(0.1)
                job = wait_done(queue, 5.0)
            finally:
                db.dispose()
    if not peak:
        raise RuntimeError("the job child was never seen")
    return {"peak_rss_mb": peak / 1024, "seconds": time.perf_counter() - t0,
            "instances": int(job["result"]["instances"])}


def main() -> int:
    """Run the measurements, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, nargs="*", default=[100, 300, 600, 1500])
    ap.add_argument("--volume", type=int, nargs="*", default=[150],
                    help="slices of the volume-mode x4 series")
    ap.add_argument("--which", nargs="*", default=["enhance", "worker"])
    ap.add_argument("--budget", type=float, default=None, help="[engine] memory_budget_mb")
    ap.add_argument("--inputs", default=str(Path(tempfile.gettempdir()) / "srnode-memory-inputs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    inputs = Path(args.inputs)
    inputs.mkdir(parents=True, exist_ok=True)
    cases = [("slice", 2, n) for n in args.slices] + [("volume", 4, n) for n in args.volume]
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    if out.exists():  # keep the cases not re-measured this time
        rows = [r for r in json.loads(out.read_text()).get("rows", [])
                if (r["mode"], r["slices"], r["process"]) not in
                {(m, n, w) for m, _, n in cases for w in args.which}]
    for mode, scale, n in cases:
        src = _inputs(inputs, n)
        for which in args.which:
            with tempfile.TemporaryDirectory(prefix="srnode-mem-") as tmp:
                fn = measure_enhance if which == "enhance" else measure_worker
                r = fn(src, mode, scale, Path(tmp), args.budget)
            row = {"process": "srnode enhance" if which == "enhance" else "worker child",
                   "mode": mode, "scale": scale, "slices": n, **r,
                   "goal_mb": GOALS_MB[mode], "within_goal": r["peak_rss_mb"] <= GOALS_MB[mode]}
            rows.append(row)
            print(f"{row['process']:<15} {mode:<6} x{scale} {n:>5} slices -> "
                  f"{r['instances']:>5} instances: peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"({r['seconds']:.0f} s)", flush=True)
    rows.sort(key=lambda r: (r["mode"], r["process"], r["slices"]))
    print(f"\n{'process':<15} {'mode':<8} {'slices':>6} {'outputs':>7} {'peak RSS MB':>12} "
          f"{'goal MB':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['process']:<15} {r['mode'] + ' x' + str(r['scale']):<8} {r['slices']:>6} "
              f"{r['instances']:>7} {r['peak_rss_mb']:>12.0f} {r['goal_mb']:>8.0f} "
              f"{r['seconds']:>8.0f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "rows": rows, "cpus": os.cpu_count(), "host": platform.node(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "memory_budget_mb": args.budget,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
