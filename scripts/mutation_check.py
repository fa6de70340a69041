"""Mutation check: break one promise at a time in a copy of the code and see a test fail.

Each mutant is one small, documented change to product code (or to a shipped weights file) that
breaks a promise the README makes.  The runner copies the tracked files to a temporary folder,
applies one mutant, runs the tests named for it and reports whether the suite noticed
("killed") or not ("survived").  A mutant whose code no longer exists is reported as "stale"
(update the list when the code moves).

Usage (from the repository root)::

    .venv/bin/python scripts/mutation_check.py            # every mutant
    .venv/bin/python scripts/mutation_check.py heartbeat  # mutants whose name contains this

Exit status 0 when every selected mutant was killed.

Not listed: removing the conditional-update guard of a claim (``Job.state == seen_state AND
Job.attempts == seen_attempts``) is an equivalent mutant today, because the claim transaction
already serialises claimers (``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL); the racing-claim tests in ``tests/test_storage_jobs.py`` cover the two together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One broken promise.

    Attributes
    ----------
    name
        Short identifier.
    promise
        What the change breaks (as the README states it).
    file
        File to change, relative to the repository root.
    find, replace
        Exact text (must occur exactly once) and its replacement; ignored when ``apply`` is set.
    tests
        pytest arguments that must fail with the mutant in place.
    apply
        Custom change of the copy (e.g. of a weights file) instead of find/replace.
    """

    name: str
    promise: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    apply: Callable[[Path], None] | None = field(default=None, compare=False)


def _scale_last_layer(factor: float, stem: str = "fast_slice_x2") -> Callable[[Path], None]:
    """Scale the output layer of a shipped weights file (a weaker or negated model)."""

    def apply(copy: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = copy / "sr_engine" / "weights" / f"{stem}.safetensors"
        tensors = load_file(str(path))
        last = sorted(k for k in tensors if k.endswith("weight"))[-1]
        tensors[last] = tensors[last] * factor
        save_file(tensors, str(path))

    return apply


def _cell_pick(cell: str, group: str, worst: float) -> Callable[[Path], None]:
    """Give ``group`` a worst gain of ``worst`` in one cell of the shipped slice x2 table.

    E.g. what the table built without the stress cases recorded for it.
    """

    def apply(copy: Path) -> None:
        path = copy / "sr_engine" / "weights" / "selection_slice_x2.json"
        table = json.loads(path.read_text())
        table["by_estimate"].setdefault(group, {})[cell] = worst
        path.write_text(json.dumps(table))

    return apply


def _drop_half_strength(name: str) -> Callable[[Path], None]:
    """Remove the ``<group>@0.5`` candidates of a shipped volume selection table."""

    def apply(copy: Path) -> None:
        path = copy / "sr_engine" / "weights" / name
        table = json.loads(path.read_text())
        for key in ("mean", "min"):
            table[key] = {w: row for w, row in table[key].items() if "@" not in w}
        path.write_text(json.dumps(table))

    return apply


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "gate-ct-hold", "the safety gate holds a CT series whose mean error exceeds hold bound",
        "dicom_node/pipeline.py",
        "if modality == \"CT\" and c.mean_abs_error > safety.hold_mean_abs_error:",
        "if False:",
        ("tests/test_worker.py::test_safety_gate_holds_nan_and_infinite_figures",),
    ),
    Mutant(
        "gate-nan", "a NaN consistency figure is held, never sent",
        "dicom_node/pipeline.py",
        "if math.isnan(c.psnr) or c.psnr == -math.inf:",
        "if not math.isfinite(c.psnr) and c.psnr < 0:",
        ("tests/test_worker.py::test_safety_gate_holds_nan_and_infinite_figures",),
    ),
    Mutant(
        "heartbeat", "a running job's lease is renewed by heartbeats",
        "dicom_node/worker.py",
        "if not self.queue.heartbeat(job.id, self.worker_id, w.lease_seconds):",
        "if False:",
        ("tests/test_promises.py::test_worker_renews_the_lease_while_the_child_runs",),
    ),
    Mutant(
        "timeout-kill", "a job past its timeout is stopped (the child process is killed)",
        "dicom_node/worker.py",
        "                proc.kill()\n                proc.join()\n"
        "                msg = f\"processing",
        "                msg = f\"processing",
        ("tests/test_promises.py::test_processing_timeout_kills_the_child_before_the_job_fails",),
    ),
    Mutant(
        "fsync-file", "a received file is fsynced before it is renamed into place",
        "storage/filestore.py",
        "            os.fsync(fd)\n",
        "            pass\n",
        ("tests/test_promises.py::test_received_file_is_fsynced_renamed_folder_fsynced_then_indexed",),
    ),
    Mutant(
        "fsync-atomic", "a written file is fsynced before the rename (derived series, manifest)",
        "storage/filestore.py",
        "                os.fsync(fh.fileno())\n",
        "                pass\n",
        ("tests/test_promises.py::test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after",),
    ),
    Mutant(
        "fsync-dir", "the folder is fsynced after the rename",
        "storage/filestore.py",
        "        os.fsync(fd)\n    except OSError:\n        pass\n    finally:",
        "        pass\n    except OSError:\n        pass\n    finally:",
        ("tests/test_promises.py::test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after",),
    ),
    Mutant(
        "row-column-shift", "the derived series keeps the source field of view",
        "dicom_node/derive/geometry.py",
        "shift = row_dir * 0.5 * (dx - source.spacing[2])"
        " + col_dir * 0.5 * (dy - source.spacing[1])",
        "shift = row_dir * 0.5 * (dy - source.spacing[1])"
        " + col_dir * 0.5 * (dx - source.spacing[2])",
        ("tests/test_promises.py::test_slice_mode_keeps_the_field_of_view_on_oblique_non_square_stacks",),
    ),
    Mutant(
        "volume-offsets", "volume-mode slices sit where the slab partition puts them",
        "dicom_node/derive/geometry.py",
        "    return np.asarray(result.slice_offsets, dtype=np.float64) / dz",
        "    return (np.asarray(result.slice_offsets, dtype=np.float64)"
        " + 0.5 * result.spacing[0]) / dz",
        ("tests/test_promises.py::test_volume_mode_slices_partition_the_source_slabs",),
    ),
    Mutant(
        "no-autocast", "on CUDA the network runs in mixed precision (float16 autocast)",
        "sr_engine/tiling.py",
        "    if not amp or kind not in AMP_DTYPE:",
        "    if True:",
        ("tests/test_engine_precision.py",),
    ),
    Mutant(
        "no-oom-fallback", "a CUDA out-of-memory error finishes the job on the CPU",
        "sr_engine/inference.py",
        "            if device != \"cuda\":\n                raise",
        "            if True:\n                raise",
        ("tests/test_engine_precision.py::test_cuda_out_of_memory_falls_back_to_the_cpu",),
    ),
    Mutant(
        "weak-weights", "the shipped fast slice x2 weights keep the gain their model card states",
        "sr_engine/weights/fast_slice_x2.safetensors", "", "",
        ("tests/test_engine_shipped.py",),
        apply=_scale_last_layer(0.4),
    ),
    Mutant(
        "negated-weights", "the shipped fast slice x2 weights beat interpolation",
        "sr_engine/weights/fast_slice_x2.safetensors", "", "",
        ("tests/test_engine_shipped.py",),
        apply=_scale_last_layer(-1.0),
    ),
    Mutant(
        "weak-family-weights", "the family weights the node picks (here: lanczos x2) keep the "
        "gain recorded for them",
        "sr_engine/weights/fast_slice_x2_lanczos.safetensors", "", "",
        ("tests/test_engine_shipped.py::test_family_weights_keep_their_recorded_gain",),
        apply=_scale_last_layer(0.4, "fast_slice_x2_lanczos"),
    ),
    Mutant(
        "adapt-estimated-only", "the volume adaptation hedges over the profile families",
        "sr_engine/estimate.py",
        'ADAPT_POLICY = "posterior"',
        'ADAPT_POLICY = "estimated"',
        ("tests/test_engine_robust.py::"
         "test_adaptation_hedges_over_the_profile_families_the_data_cannot_tell_apart",),
    ),
    Mutant(
        "adapt-overconfident", "the adaptation's family posterior keeps its calibrated "
        "temperature",
        "sr_engine/estimate.py",
        "ADAPT_POSTERIOR_SCALE = 0.15",
        "ADAPT_POSTERIOR_SCALE = 0.01",
        ("tests/test_engine_robust.py::"
         "test_adaptation_hedges_over_the_profile_families_the_data_cannot_tell_apart",),
    ),
    Mutant(
        "x4-guard-off", "slice x4 weights need their estimate cell's agreement",
        "sr_engine/estimate.py",
        "    return best, round(min(gains[best], worst), 3)",
        "    return best, gains[best]",
        ("tests/test_engine_robust.py::"
         "test_slice_x4_keeps_the_expected_worst_case_pick_only_when_its_cell_agrees",),
    ),
    Mutant(
        "residual-scale", "a weights group at alpha runs cubic + alpha x its residual",
        "sr_engine/models/base.py",
        "            y = y * self.residual_scale",
        "            pass",
        ("tests/test_engine_robust.py::test_residual_scale_shrinks_the_output_towards_cubic",
         "tests/test_engine_robust.py::"
         "test_a_scaled_group_chosen_by_the_table_is_applied_and_described"),
    ),
    Mutant(
        "kernel-candidates", "slice mode interpolates with a Lanczos-3 blend where it is safe",
        "sr_engine/estimate.py",
        'INTERPOLATION_CANDIDATES: tuple[str, ...] = ("lanczos3@0.5", "lanczos3@0.25")',
        "INTERPOLATION_CANDIDATES: tuple[str, ...] = ()",
        ("tests/test_engine_robust.py::"
         "test_smooth_hr_sharply_degraded_gains_from_the_safer_interpolation",),
    ),
    Mutant(
        "kernel-noise-limit", "no sharper interpolation on a series noisier than the validation",
        "sr_engine/estimate.py",
        "        return None  # noisier than every validation case: a sharper kernel passes more",
        "        pass  # noisier than every validation case: a sharper kernel passes more",
        ("tests/test_engine_robust.py::"
         "test_no_sharper_interpolation_for_a_series_noisier_than_every_validation_case",),
    ),
    Mutant(
        "min-cell-cases", "a selection cell needs 16 validation cases before it is trusted",
        "sr_engine/estimate.py", "MIN_CELL_CASES = 16", "MIN_CELL_CASES = 8",
        ("tests/test_engine_robust.py::test_a_thin_cell_is_not_trusted_with_weights",),
    ),
    Mutant(
        "on-fallback-skip", "[safety] on_fallback = skip sends nothing for an interpolation",
        "dicom_node/pipeline.py",
        '    if fallback_reason and safety.on_fallback == "skip":',
        "    if False:",
        ("tests/test_sr_choice.py::"
         "test_on_fallback_skip_finishes_the_job_without_a_derived_series",),
    ),
    Mutant(
        "kernel-blend", "lanczos3@alpha runs cubic + alpha x (lanczos3 - cubic)",
        "sr_engine/models/base.py",
        "            out = cubic + self.residual_scale * (out - cubic)",
        "            pass",
        ("tests/test_engine_robust.py::"
         "test_an_interpolation_chosen_by_the_table_is_labelled_as_interpolation",),
    ),
    Mutant(
        "stress-table", "slice tables are safe on aliased, off-grid sampling (stress cases)",
        "sr_engine/weights/selection_slice_x2.json", "", "",
        ("tests/test_engine_robust.py::test_aliased_decimation_is_not_made_worse_than_bicubic",),
        apply=_cell_pick("area_sharp|1", "hedge", 2.044),
    ),
    Mutant(
        "x3-full-strength", "volume x3 uses its profile weights at half strength (x3 table)",
        "sr_engine/weights/selection_volume_x3.json", "", "",
        ("tests/test_engine_robust.py::"
         "test_volume_x3_choice_is_not_worse_than_cubic_where_it_used_to_lose",),
        apply=_drop_half_strength("selection_volume_x3.json"),
    ),
    Mutant(
        "negated-hedge-weights", "the hedging weights beat interpolation",
        "sr_engine/weights/fast_slice_x2_hedge.safetensors", "", "",
        ("tests/test_engine_shipped.py::test_family_weights_keep_their_recorded_gain",),
        apply=_scale_last_layer(-1.0, "fast_slice_x2_hedge"),
    ),
)


def _copy_tree(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of the repository to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run_mutant(mutant: Mutant, timeout: float) -> dict[str, object]:
    """Apply one mutant to a fresh copy, run its tests, return the outcome."""
    with tempfile.TemporaryDirectory(prefix="srnode-mutant-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        if mutant.apply is not None:
            mutant.apply(copy)
        else:
            path = copy / mutant.file
            text = path.read_text()
            if text.count(mutant.find) != 1:
                return {"name": mutant.name, "outcome": "stale", "seconds": 0.0,
                        "detail": f"text to change found {text.count(mutant.find)} times"}
            path.write_text(text.replace(mutant.find, mutant.replace))
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(copy)}
        try:
            proc = subprocess.run(
                # -n 0: one process (the suite's addopts ask for 2 xdist workers, under which
                # -x ends the session as "interrupted", exit status 2, not as "failed")
                [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
                 *mutant.tests],
                cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
            )
            # pytest: 0 all passed, 1 a test failed; 2-5 interrupted, internal or usage error,
            # nothing collected: the check itself is broken, not a kill
            outcome = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
            detail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        except subprocess.TimeoutExpired:
            outcome, detail = "killed", f"tests timed out after {timeout:.0f} s"
        return {"name": mutant.name, "outcome": outcome,
                "seconds": round(time.monotonic() - t0, 1), "detail": detail}


def main(argv: list[str] | None = None) -> int:
    """Run the selected mutants, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("select", nargs="*", help="run only mutants whose name contains one of these")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "mutation.json"))
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.select or any(s in m.name for s in args.select)]
    results = []
    for m in chosen:
        r = run_mutant(m, args.timeout)
        results.append({**r, "promise": m.promise})
        print(f"{r['outcome']:<9} {m.name:<18} {r['seconds']:>6} s  {m.promise}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["outcome"] != "killed"]
    print(f"\n{len(results) - len(bad)}/{len(results)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
