"""``srnode``: a thin command-line shell over the library.

Each sub-command parses its arguments and calls one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import Config, ConfigError, load_config
from sr_engine.tasks import MODES
from storage.job_types import JobState

LOGGER = logging.getLogger(__name__)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _parse_peer(text: str) -> tuple[str, str, int]:
    """Parse ``AE@HOST:PORT``."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected AE@HOST:PORT, got {text!r}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: SCP, completeness scheduler and worker."""
    from dicom_node.app import serve
    from dicom_node.logs import configure_logging

    cfg = _config(args)
    configure_logging(cfg.node.log_level, cfg.node.log_file or None)
    try:
        return serve(cfg)
    except OSError as exc:
        where = f"{cfg.node.host}:{cfg.node.port}"
        if cfg.http.enabled:
            where += f" or HTTP {cfg.http.host}:{cfg.http.port}"
        print(f"srnode serve: cannot listen on {where}: {exc.strerror or exc} "
              "(is another node running? change [node] port or [http] port)", file=sys.stderr)
        return 2


def cmd_worker(args: argparse.Namespace) -> int:
    """Run only the worker loop (another machine sharing the queue and the storage folder)."""
    from dicom_node.app import serve
    from dicom_node.logs import configure_logging

    cfg = _config(args)
    configure_logging(cfg.node.log_level, cfg.node.log_file or None)
    return serve(cfg, receive=False)


def cmd_echo(args: argparse.Namespace) -> int:
    """Send a C-ECHO to a peer."""
    from dicom_node.network.scu import DestinationUnavailableError, SendError, echo

    cfg = _config(args)
    ae, host, port = args.peer
    try:
        status = echo(ae, host, port, calling_ae_title=args.calling_ae or cfg.node.ae_title,
                      timeout=args.timeout)
    except (DestinationUnavailableError, SendError) as exc:
        print(f"C-ECHO to {ae}@{host}:{port} failed: {exc}", file=sys.stderr)
        return 2
    print(f"C-ECHO to {ae}@{host}:{port}: status 0x{status:04X}"
          f"{' (success)' if status == 0 else ''}")
    return 0 if status == 0 else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs."""
    from dicom_node.index import index_created, open_index
    from dicom_node.status import format_skipped, skipped_series
    from storage.jobs import JobQueue

    db = open_index(_config(args), migrate=False)
    try:
        jobs = (JobQueue(db).list_jobs(states=args.state or None, limit=args.limit)
                if index_created(db) else [])
        skipped = skipped_series(db) if index_created(db) and not args.json else []
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(jobs, indent=2, default=str))
        return 0
    for line in format_skipped(skipped):
        print(line)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'ID':>5}  {'STATE':<10} {'STAGE':<10} {'TRY':>3}  {'MOD':<3}  {'RULE':<12} "
          f"{'SERIES DESCRIPTION':<28} ERROR")
    for j in jobs:
        print(f"{j['id']:>5}  {j['state']:<10} {(j.get('stage') or ''):<10} {j['attempts']:>3}  "
              f"{(j.get('modality') or ''):<3}  {(j.get('rule') or '')[:12]:<12} "
              f"{(j.get('series_description') or '')[:28]:<28} {(j.get('error') or '')[:60]}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Summarise the node's state; exit 1 when a health check fails (as /healthz: 503)."""
    from dicom_node.status import format_status, node_report

    report = node_report(_config(args))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0 if report["health"]["status"] == "ok" else 1


def cmd_purge(args: argparse.Namespace) -> int:
    """Apply [retention] now (or, with --dry-run, list what would go)."""
    from dicom_node.housekeeping import format_purge, purge_now

    report = purge_now(_config(args), dry_run=args.dry_run)
    print(json.dumps(report.describe(), indent=2) if args.json else format_purge(report))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-queue a failed or held job."""
    from dicom_node.index import open_index
    from storage.errors import InvalidJobStateError, JobNotFoundError
    from storage.jobs import JobQueue

    db = open_index(_config(args), migrate=True)
    try:
        JobQueue(db).retry(args.job_id)
    except (JobNotFoundError, InvalidJobStateError) as exc:
        print(f"cannot retry job {args.job_id}: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(f"job {args.job_id} re-queued")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued, held or running job (a running one is stopped by its worker)."""
    from dicom_node.index import open_index
    from storage.errors import InvalidJobStateError, JobNotFoundError
    from storage.jobs import JobQueue

    db = open_index(_config(args), migrate=True)
    try:
        previous = JobQueue(db).cancel(args.job_id)
    except (JobNotFoundError, InvalidJobStateError) as exc:
        print(f"cannot cancel job {args.job_id}: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(f"job {args.job_id} cancelled (was {previous})")
    return 0


def cmd_enhance(args: argparse.Namespace) -> int:
    """Enhance DICOM files offline and write derived series."""
    from dicom_node.pipeline import EnhanceError, EnhanceIncompleteError, enhance_path

    cfg = _config(args)
    status = 0
    try:
        written = enhance_path(
            Path(args.input), Path(args.output), cfg,
            mode=args.mode, scale=args.scale, model=args.model, progress=not args.quiet,
            keep_going=args.keep_going,
        )
    except EnhanceIncompleteError as exc:
        print(f"srnode enhance: {exc}", file=sys.stderr)
        written, status = exc.written, 1
    except EnhanceError as exc:
        print(f"srnode enhance: {exc}", file=sys.stderr)
        return 2
    for series_uid, paths in written.items():
        print(f"derived series {series_uid}: {len(paths)} instance(s) in {paths[0].parent}")
    return status


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model (see sr_engine.training) on natural images and generated phantoms."""
    from sr_engine.errors import EngineError
    from sr_engine.training import train

    cfg = _config(args)
    out = Path(args.out or cfg.engine.weights_dir or "var/models")
    try:
        report = train(
            model=args.model, mode=args.mode, scale=args.scale, steps=args.steps,
            out_dir=out, seed=args.seed, resume=args.resume, threads=args.threads,
            init_weights=Path(args.init) if args.init else None, progress=not args.quiet,
        )
    except (EngineError, ValueError) as exc:
        print(f"srnode train: {exc}", file=sys.stderr)
        return 2
    print(f"trained {report.model} {report.mode} x{report.scale}: {report.steps} steps, "
          f"L1 {report.first_loss:.4f} -> {report.final_loss:.4f} in {report.seconds:.0f} s")
    print(f"weights: {report.weights}")
    print(f"use them: set [engine] weights_dir = \"{out}\" (or --weights-dir for evaluate)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model against its baseline on DICOM or NIfTI inputs."""
    from dicom_node.pipeline import EnhanceError, evaluate_paths

    try:
        cfg = _config(args)
        wdir = args.weights_dir or cfg.engine.weights_dir
        ensemble = (cfg.engine.self_ensemble_request if args.self_ensemble is None
                    else args.self_ensemble)
        report = evaluate_paths(
            [Path(p) for p in args.paths], mode=args.mode, scale=args.scale, model=args.model,
            weights_dir=Path(wdir) if wdir else None, self_ensemble=ensemble,
            degradations=args.degradations, max_slices=args.max_slices,
            adapt_seconds=args.adapt_seconds,
        )
    except EnhanceError as exc:
        print(f"srnode evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.degradations != "nominal":
        return _print_robustness(report, args.check)
    print(f"{'case':<40} {'PSNR':>8} {'base':>8} {'gain':>7} {'SSIM':>7} {'base':>7} "
          f"{'s/slice':>8}  node's choice (estimated degradation)")
    for c in report["cases"]:
        print(f"{c['name'][:40]:<40} {c['psnr']:8.2f} {c['psnr_baseline']:8.2f} "
              f"{c['psnr'] - c['psnr_baseline']:+7.2f} {c['ssim']:7.4f} {c['ssim_baseline']:7.4f} "
              f"{c['seconds_per_slice']:8.3f}  {c.get('choice', '')}")
    print(f"mean PSNR gain {report['mean_psnr_gain_db']:+.2f} dB, "
          f"mean SSIM gain {report['mean_ssim_gain']:+.4f}")
    return 0


def _print_robustness(report: dict, check: bool) -> int:
    """Print ``srnode evaluate --degradations`` per degradation; 1 if ``check`` and broken."""
    print(f"{report['model']} against {report['baseline']}, {report['mode']} x{report['scale']}: "
          f"PSNR gain (dB) per degradation")
    print(f"{'degradation':<32} {'kind':<27} {'cases':>5} {'mean':>7} {'worst':>7} "
          f"{'below':>5} {'interpolated':>12}")
    for label, d in report["by_degradation"].items():
        print(f"{label[:32]:<32} {d['kind']:<27} {d['cases']:5d} {d['mean_gain']:+7.2f} "
              f"{d['worst_gain']:+7.2f} {d['below']:5d} {d['fallbacks']:12d}")
    tol = report["tolerance_db"]
    if report["promise_kept"]:
        print(f"promise kept: none of {report['cases']} cases is worse than {report['baseline']} "
              f"by more than {tol} dB (worst {report['worst_gain']:+.2f}, mean "
              f"{report['mean_gain']:+.2f})")
        return 0
    print(f"PROMISE BROKEN: {report['below']} of {report['cases']} cases are worse than "
          f"{report['baseline']} by more than {tol} dB (worst {report['worst_gain']:+.2f})")
    for r in report["rows"]:
        if r["gain"] < -tol:
            print(f"  {r['name'][:40]:<40} {r['degradation'][:32]:<32} {r['gain']:+.2f}  "
                  f"{r['choice']}")
    return 1 if check else 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = argparse.ArgumentParser(
        prog="srnode",
        description="srnode: a DICOM node that enhances CT and MRI with super-resolution and "
        "returns a new derived series.",
    )
    parser.add_argument("--version", action="version", version=f"srnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, metavar="PATH",
                       help="configuration file (default: ./config.toml; built-in defaults "
                       "if absent)")
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the node: receive, queue, enhance and send")
    add("worker", cmd_worker, "run only the worker loop (extra workers sharing a PostgreSQL queue "
        "and the storage folder)")

    p = add("echo", cmd_echo, "send a C-ECHO (DICOM ping) to a peer")
    p.add_argument("peer", type=_parse_peer, metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default=None, help="calling AE title (default: [node] ae_title)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    p = add("jobs", cmd_jobs, "list jobs in the queue")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--state", action="append", choices=[str(s) for s in JobState],
                   help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=500)

    p = add("status", cmd_status, "counts of series, instances and jobs; disk; recent failures")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("purge", cmd_purge, "apply [retention] now: delete finished series and derived "
            "output it selects")
    p.add_argument("--dry-run", action="store_true", help="only list what would be purged")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("retry", cmd_retry, "re-queue a failed or held job")
    p.add_argument("job_id", type=int)

    p = add("cancel", cmd_cancel, "cancel a queued, held or running job")
    p.add_argument("job_id", type=int)

    p = add("enhance", cmd_enhance, "enhance DICOM files offline into derived series")
    p.add_argument("input", help="a DICOM file or a folder (searched recursively)")
    p.add_argument("output", help="folder for the derived series")
    p.add_argument("--mode", choices=MODES, default="slice")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--model", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even when files or series were skipped (they are still named)")

    p = add("train", cmd_train, "train a super-resolution model")
    p.add_argument("--model", default="fast")
    p.add_argument("--mode", choices=MODES, default="slice")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=None,
                   help="output folder (default: [engine] weights_dir, else ./var/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start from these weights (fine-tuning)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("evaluate", cmd_evaluate, "PSNR/SSIM of a model against its baseline")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files/folders or NIfTI files")
    p.add_argument("--mode", choices=MODES, default="slice")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--model", default="auto")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--weights-dir", default=None,
                   help="folder searched first for weights (default: [engine] weights_dir)")
    p.add_argument("--self-ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="geometric self-ensemble of the model (default: [engine] self_ensemble, "
                   "\"auto\" = on in volume mode, off in slice mode, as when the node enhances)")
    p.add_argument("--degradations", choices=("nominal", "families", "all"), default="nominal",
                   help="how the low-resolution input is made from each image: the nominal "
                   "operator (default), every trained degradation family, or also operators "
                   "outside them (aliasing, anisotropic blur, motion, noise, ...): a check of "
                   "the promise never to be worse than interpolation on your own images")
    p.add_argument("--max-slices", type=int, default=16,
                   help="with --degradations, slice mode: at most this many evenly spaced slices "
                   "per series (0: all; default 16)")
    p.add_argument("--adapt-seconds", type=float, default=0.0,
                   help="with --degradations, volume mode: per-series adaptation as the node "
                   "runs it ([engine] adapt_seconds; default 0 here, the shipped weights alone, "
                   "to keep the check short: each degradation adapts anew)")
    p.add_argument("--check", action="store_true",
                   help="with --degradations: exit with status 1 when a case is worse than "
                   "interpolation by more than 0.1 dB")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``srnode`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"srnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
