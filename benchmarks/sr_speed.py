"""Speed and memory of the SR engine.

* ``fast`` slice x2 on 512x512 slices: slices/s on the CPU (2 threads) with the default tile
  budget (256, overlap 16) and with one tile per slice; on CUDA as well when present.
* Peak memory for a 600-slice 512x512 series under the tile budget: measured in subprocesses
  (ru_maxrss above the post-import baseline, plus tracemalloc peak of numpy/python allocations)
  for a few smaller series and extrapolated linearly (memory grows linearly with slices: the
  input copy and the x4-sized output dominate; torch buffers are per batch).

Prints a table and writes benchmarks/results/sr_speed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sr_engine import EnhanceRequest, WeightsNotFoundError, enhance_volume
from sr_engine.data import ct_phantom

RESULTS = Path(__file__).resolve().parent / "results"


def series(n: int, size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = [ct_phantom(size, rng) for _ in range(min(n, 4))]
    return np.stack([base[i % len(base)] for i in range(n)]).astype(np.float32)


def speed(device: str, tile: int, slices: int, model: str = "fast") -> float:
    vol = series(slices)
    req = EnhanceRequest(model=model, device=device, tile_size=tile, batch_size=4)
    enhance_volume(vol[:2], (1.0, 0.5, 0.5), 1.0, "CT", req)  # warm-up
    t0 = time.perf_counter()
    res = enhance_volume(vol, (1.0, 0.5, 0.5), 1.0, "CT", req)
    assert res.device == device
    return slices / (time.perf_counter() - t0)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def memory_child(n: int) -> None:
    import threading
    import tracemalloc

    torch.set_num_threads(2)
    vol = series(n)
    enhance_volume(vol[:1, :64, :64], (1.0, 0.5, 0.5), 1.0, "CT", EnhanceRequest(model="fast"))
    base = _rss_mb()
    peak_rss = [base]
    done = threading.Event()

    def sample() -> None:  # RSS sampled every 5 ms (ru_maxrss is not reliable in this VM)
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], _rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tracemalloc.start()
    enhance_volume(vol, (1.0, 0.5, 0.5), 1.0, "CT", EnhanceRequest(model="fast"))
    _, peak = tracemalloc.get_traced_memory()
    done.set()
    thread.join()
    print(json.dumps({"slices": n, "rss_above_input_mb": peak_rss[0] - base,
                      "tracemalloc_peak_mb": peak / 2**20, "input_mb": vol.nbytes / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--memory-slices", type=int, nargs="+", default=[24, 48])
    ap.add_argument("--child", type=int, default=None)
    args = ap.parse_args()
    if args.child is not None:
        memory_child(args.child)
        return
    torch.set_num_threads(2)
    rows = {}
    rows["cpu_fast_x2_tile256_slices_per_s"] = speed("cpu", 256, args.slices)
    rows["cpu_fast_x2_tile512_slices_per_s"] = speed("cpu", 512, args.slices)
    try:
        rows["cpu_residual_x2_tile512_slices_per_s"] = speed("cpu", 512,
                                                             max(4, args.slices // 4), "residual")
    except WeightsNotFoundError:
        print("residual weights missing: skipped")
    if torch.cuda.is_available():
        rows["cuda_fast_x2_tile512_slices_per_s"] = speed("cuda", 512, 4 * args.slices)
        rows["cuda_residual_x2_tile512_slices_per_s"] = speed("cuda", 512, 4 * args.slices,
                                                              "residual")
    mem = []
    for n in args.memory_slices:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True,
                             capture_output=True, text=True).stdout
        mem.append(json.loads(out.strip().splitlines()[-1]))
    (n1, n2), key = (mem[0]["slices"], mem[-1]["slices"]), "tracemalloc_peak_mb"
    for k in ("rss_above_input_mb", key):
        slope = (mem[-1][k] - mem[0][k]) / (n2 - n1)
        rows[f"extrapolated_600_slices_{k}"] = mem[0][k] + slope * (600 - n1)
        rows[f"per_slice_{k}"] = slope
    rows["input_600_slices_mb"] = 600 * 512 * 512 * 4 / 2**20
    rows["output_600_slices_x2_mb"] = 4 * rows["input_600_slices_mb"]
    print(f"{'metric':48} {'value':>10}")
    for k, v in rows.items():
        print(f"{k:48} {v:10.2f}")
    print("memory samples:", json.dumps(mem))
    if not torch.cuda.is_available():
        print("CUDA: not available on this machine (no GPU numbers)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sr_speed.json").write_text(json.dumps(
        {"results": rows, "memory_samples": mem, "threads": 2,
         "cuda": torch.cuda.is_available()}, indent=1))
    print(f"wrote {RESULTS / 'sr_speed.json'}")


if __name__ == "__main__":
    main()
