"""From stored source files to written derived series: shared by the worker and ``srnode enhance``.

load series -> SR engine -> safety gate -> derived-series builder -> files.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.config import Config, SafetyConfig
from dicom_node.derive.files import write_datasets
from sr_engine.api import ConsistencyReport, EnhanceRequest, EnhanceResult

LOGGER = logging.getLogger(__name__)

Gate = Literal["send", "warn", "hold", "skip"]


class EnhanceError(Exception):
    """Nothing could be enhanced (bad input, no usable series)."""


class ConsistencyFigures(TypedDict):
    """The re-degradation check of a job (modality units; PSNR in dB)."""

    mean_abs_error: float
    max_abs_error: float
    psnr: float


class JobOutcome(TypedDict, total=False):
    """What a finished (or held) job records as its result: ``srnode jobs --json``, the audit.

    The worker adds ``destinations`` (instances delivered per destination), ``stage_seconds``
    and, for a held series, ``held``; for a series not sent because it would only be an
    interpolation (``[safety] on_fallback = "skip"``), ``skipped`` (its derived Series Instance
    UID was never written or sent).
    """

    source_series_instance_uid: str
    derived_series_instance_uid: str
    instances: int
    model: str
    model_version: str
    device: str
    rows: int
    columns: int
    consistency: ConsistencyFigures
    gate: Gate
    gate_reason: str
    degradation: dict[str, Any] | None
    choice: Literal["model", "interpolation"]
    fallback_reason: str | None
    adaptation: dict[str, float | str] | None
    engine: str
    notes: list[str]
    destinations: dict[str, int]
    stage_seconds: dict[str, float]
    held: bool
    skipped: bool


@dataclass
class Derivation:
    """The outcome of deriving one series."""

    source_series_uid: str
    derived_series_uid: str
    datasets: list[Dataset]
    result: EnhanceResult
    gate: Gate
    gate_reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> JobOutcome:
        """JSON-serialisable facts for the job result and logs."""
        c = self.result.consistency
        return {
            "source_series_instance_uid": self.source_series_uid,
            "derived_series_instance_uid": self.derived_series_uid,
            "instances": len(self.datasets),
            "model": self.result.model_name,
            "model_version": self.result.model_version,
            "device": self.result.device,
            "rows": int(self.result.volume.shape[1]),
            "columns": int(self.result.volume.shape[2]),
            "consistency": {
                "mean_abs_error": c.mean_abs_error,
                "max_abs_error": c.max_abs_error,
                "psnr": c.psnr,
            },
            "gate": self.gate,
            "gate_reason": self.gate_reason,
            "degradation": (self.result.degradation.as_dict()
                            if self.result.degradation is not None else None),
            "choice": "interpolation" if self.result.fallback_reason else "model",
            "fallback_reason": self.result.fallback_reason,
            "adaptation": self.result.adaptation,
            "engine": self.result.describe(),
            "notes": self.notes,
        }


def safety_gate(
    consistency: ConsistencyReport, modality: str, safety: SafetyConfig,
    fallback_reason: str | None = None,
) -> tuple[Gate, str]:
    """Decide from the consistency figures whether a derived series may be sent.

    The absolute-error bounds are in Hounsfield units and apply to CT only (MR units are
    arbitrary); the PSNR bounds apply to every modality.  ``fallback_reason`` (the engine used
    interpolation, bicubic or a Lanczos-3 blend, because its degradation estimate was uncertain,
    outside every trained family or had no safe weights) warns or holds per
    ``[safety] on_fallback``; the consistency is computed with the
    estimated operator, so the bounds judge the output against the degradation the series has.

    Returns
    -------
    tuple
        ``("send" | "warn" | "hold" | "skip", reason)``; ``skip`` (``on_fallback = "skip"``):
        no derived series, the job is done.
    """
    c = consistency
    if math.isnan(c.psnr) or c.psnr == -math.inf:
        return "hold", f"consistency PSNR is not a usable number ({c.psnr})"
    if not math.isfinite(c.mean_abs_error):
        return "hold", f"consistency mean error is not a number ({c.mean_abs_error})"
    if c.psnr < safety.hold_min_psnr:
        return "hold", f"consistency PSNR {c.psnr:.1f} dB < {safety.hold_min_psnr} dB"
    if modality == "CT" and c.mean_abs_error > safety.hold_mean_abs_error:
        return "hold", (f"consistency mean error {c.mean_abs_error:.1f} HU > "
                        f"{safety.hold_mean_abs_error} HU")
    if fallback_reason and safety.on_fallback == "hold":
        return "hold", f"sent as interpolation would be: {fallback_reason}"
    if fallback_reason and safety.on_fallback == "skip":
        return "skip", f"not sent: interpolation only ({fallback_reason})"
    if fallback_reason and safety.on_fallback == "warn":
        return "warn", f"interpolation instead of SR: {fallback_reason}"
    if fallback_reason:
        # the viewer's own interpolation: the consistency bounds judge SR output, whose
        # operator it was made for; interpolation is the reference they protect, not a suspect
        return "send", f"interpolation instead of SR ({fallback_reason})"
    if c.psnr < safety.warn_min_psnr:
        return "warn", f"consistency PSNR {c.psnr:.1f} dB < {safety.warn_min_psnr} dB"
    if modality == "CT" and c.mean_abs_error > safety.warn_mean_abs_error:
        return "warn", (f"consistency mean error {c.mean_abs_error:.1f} HU > "
                        f"{safety.warn_mean_abs_error} HU")
    return "send", "consistency within bounds"


def engine_request(config: Config, mode: str, scale: int, model: str,
                   output_spacing: float | None) -> EnhanceRequest:
    """The engine request of one job: the task, and how to run it from ``[engine]``.

    Parameters
    ----------
    config
        Node configuration (its ``[engine]`` section).
    mode, scale, model
        The task.
    output_spacing
        Volume mode: requested output slice spacing in mm (``None``: spacing / scale).

    Returns
    -------
    EnhanceRequest
        The request both the whole-series and the streamed paths send to the engine.
    """
    return EnhanceRequest(
        mode=mode,  # type: ignore[arg-type]
        scale=scale,
        model=model,
        device=config.engine.device,
        batch_size=config.engine.batch_size,
        tile_size=config.engine.tile_size,
        tile_overlap=config.engine.tile_overlap,
        output_spacing=output_spacing,
        self_ensemble=config.engine.self_ensemble_request,
        estimate_degradation=config.engine.estimate_degradation,
        adapt_seconds=config.engine.adapt_seconds,
    )


def derive_series(
    paths: Sequence[Path],
    config: Config,
    *,
    mode: str,
    scale: int,
    model: str,
    output_spacing: float | None = None,
    on_stage: Callable[[str, dict[str, float]], None] | None = None,
) -> Derivation:
    """Load one series, enhance it and build the derived data sets (no writing).

    Raises
    ------
    dicom_node.derive.series.SeriesError
        The series cannot be loaded as one consistent volume.
    """
    import time

    from dicom_node.derive.builder import DerivationOptions, build_derived_series
    from dicom_node.derive.series import load_series
    from sr_engine import enhance_volume

    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name, dict(seconds))

    stage("loading")
    t0 = time.perf_counter()
    source = load_series(paths, slice_mode=mode == "slice")
    seconds["loading"] = time.perf_counter() - t0

    stage("enhancing")
    t0 = time.perf_counter()
    request = engine_request(config, mode, scale, model, output_spacing)
    result = enhance_volume(
        source.volume, source.spacing, source.slice_thickness, source.modality, request,
        weights_dir=Path(config.engine.weights_dir) if config.engine.weights_dir else None,
    )
    seconds["enhancing"] = time.perf_counter() - t0
    gate, reason = safety_gate(result.consistency, source.modality, config.safety,
                               fallback_reason=result.fallback_reason)

    t0 = time.perf_counter()
    options = DerivationOptions.from_config(
        config.derived,
        __version__,
        description_suffix=" (CHECK)" if gate == "warn" else "",
        now=datetime.now(UTC),
        mode=mode,
        scale=scale,
        interpolated=result.interpolated,
    )
    datasets = build_derived_series(source, result, options)
    seconds["building"] = time.perf_counter() - t0
    return Derivation(
        source_series_uid=source.series_instance_uid,
        derived_series_uid=str(datasets[0].SeriesInstanceUID),
        datasets=datasets,
        result=result,
        gate=gate,
        gate_reason=reason,
        seconds=seconds,
        notes=list(source.notes),
    )


@dataclass
class WrittenSeries:
    """A derived series written slab by slab (:func:`derive_series_to`).

    Attributes
    ----------
    paths
        The written instance files, in output slice order (empty when held: nothing is kept).
    summary
        The job outcome facts.
    """

    source_series_uid: str
    derived_series_uid: str
    paths: list[Path]
    result: EnhanceResult
    gate: Gate
    gate_reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> JobOutcome:
        """JSON-serialisable facts for the job result and logs."""
        d = Derivation(self.source_series_uid, self.derived_series_uid, [], self.result,
                       self.gate, self.gate_reason, self.seconds, self.notes)
        out = d.summary()
        out["instances"] = int(self.result.volume.shape[0])
        return out


def derive_series_to(
    paths: Sequence[Path],
    config: Config,
    folder: Path,
    *,
    mode: str,
    scale: int,
    model: str,
    output_spacing: float | None = None,
    on_stage: Callable[[str, dict[str, float]], None] | None = None,
    before_write: Callable[[str], None] | None = None,
) -> WrittenSeries:
    """Derive one series into ``folder`` slab by slab, in memory bounded for any length.

    Each slab of source slices is read, enhanced, built into its derived instances and written
    (each file atomically, with fsync) before the next is read; the slab length follows from
    ``[engine] memory_budget_mb`` and the matrix (:func:`sr_engine.stream.slab_slices`).  The
    series-level figures (the re-degradation check and the gate) are known after the last slab:
    they are then filled into every written file (:func:`dicom_node.derive.files.
    complete_series`).  Publishing ``folder`` (a manifest, a rename) is the caller's, after this
    returns; a series held by the gate is removed from ``folder``.

    Parameters
    ----------
    folder
        Where the instances are written (created; it should be empty).
    before_write
        Called with the derived Series Instance UID before the first file is written.

    Raises
    ------
    dicom_node.derive.series.SeriesError
        The series cannot be loaded as one consistent volume.
    """
    import time

    from dicom_node.derive.builder import DerivationOptions, DerivedSeriesBuilder
    from dicom_node.derive.files import complete_series
    from dicom_node.derive.series import load_series, open_series, read_slab
    from sr_engine.normalise import mapping_for, mapping_from_stats
    from sr_engine.stream import SeriesEnhancer, SeriesFacts, estimate_picks, slab_slices

    seconds = {"loading": 0.0, "enhancing": 0.0, "building": 0.0, "writing": 0.0}

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name, dict(seconds))

    stage("loading")
    t0 = time.perf_counter()
    # volume mode keeps the (thick-slice) input volume: the output ranges are computed from it
    source = open_series(paths, slice_mode=True) if mode == "slice" else load_series(paths)
    n, rows, cols = source.shape
    if source.volume is not None:
        mapping = mapping_for(source.volume, source.modality)
    elif source.magnitudes is not None:
        mapping = mapping_from_stats(source.magnitudes, source.modality)
    else:
        mapping = mapping_for(np.zeros(1, np.float32), source.modality)  # CT: fixed
    if mode == "slice":
        picks = estimate_picks(n)
        sample = np.stack([read_slab(source, i, i + 1)[0][0] for i in picks])
    else:
        assert source.volume is not None
        sample = source.volume
    seconds["loading"] += time.perf_counter() - t0

    stage("enhancing")
    t0 = time.perf_counter()
    request = engine_request(config, mode, scale, model, output_spacing)
    facts = SeriesFacts(n, rows, cols, source.spacing, source.slice_thickness, source.modality,
                        source.value_min, source.value_max, mapping)
    engine = SeriesEnhancer(
        request, facts, sample,
        weights_dir=Path(config.engine.weights_dir) if config.engine.weights_dir else None)
    del sample
    seconds["enhancing"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    options = DerivationOptions.from_config(
        config.derived, __version__, now=datetime.now(UTC), mode=mode, scale=scale,
        interpolated=engine.interpolated,
    )
    builder = DerivedSeriesBuilder(source, engine.describe(), options, value_range=engine.clip)
    seconds["building"] += time.perf_counter() - t0
    if before_write is not None:
        before_write(str(builder.series_uid))
    folder.mkdir(parents=True, exist_ok=True)
    budget = config.engine.memory_budget_mb
    written: list[Path] = []

    def emit(start: int, voxels: np.ndarray, padding: Callable[[int], np.ndarray | None]
             | None) -> None:
        t = time.perf_counter()
        datasets = builder.build(start, voxels, padding)
        seconds["building"] += time.perf_counter() - t
        t = time.perf_counter()
        written.extend(write_datasets(datasets, folder))
        seconds["writing"] += time.perf_counter() - t

    if mode == "slice":
        step = slab_slices("slice", scale, rows, cols, budget, n)
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            stage("loading")
            t = time.perf_counter()
            volume, mask = read_slab(source, i0, i1)
            seconds["loading"] += time.perf_counter() - t
            stage("enhancing")
            t = time.perf_counter()
            out = engine.enhance_slices(volume)
            seconds["enhancing"] += time.perf_counter() - t
            del volume

            def padding(j: int, i0: int = i0, mask: np.ndarray | None = mask) -> np.ndarray | None:
                return None if mask is None else mask[j - i0]

            stage("building")
            emit(i0, out, padding)
            del out, mask
    else:
        for k0, k1 in engine.output_ranges(budget):
            stage("enhancing")
            t = time.perf_counter()
            out = engine.enhance_output_range(k0, k1)
            seconds["enhancing"] += time.perf_counter() - t
            stage("building")
            emit(k0, out, None)
            del out
    t0 = time.perf_counter()
    result = engine.finish()
    seconds["enhancing"] += time.perf_counter() - t0
    gate, reason = safety_gate(result.consistency, source.modality, config.safety,
                               fallback_reason=result.fallback_reason)
    t0 = time.perf_counter()
    if gate in ("hold", "skip"):
        for p in written:
            p.unlink(missing_ok=True)
        written = []
    else:
        complete_series(written, builder.completion(result.consistency,
                                                    " (CHECK)" if gate == "warn" else ""))
    seconds["writing"] += time.perf_counter() - t0
    return WrittenSeries(
        source_series_uid=source.series_instance_uid,
        derived_series_uid=str(builder.series_uid),
        paths=written,
        result=result,
        gate=gate,
        gate_reason=reason,
        seconds=seconds,
        notes=list(source.notes),
    )


@dataclass
class InputScan:
    """What :func:`scan_input` found under an input path.

    Attributes
    ----------
    series
        Series Instance UID -> readable DICOM files.
    unreadable
        ``(file, reason)`` of DICOM files that cannot be read (truncated, incomplete header).
    not_dicom
        Files that are not DICOM at all (ignored, but named).
    own_output
        Series Instance UID -> files of series srnode produced (skipped, as the node does).
    """

    series: dict[str, list[Path]] = field(default_factory=dict)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    not_dicom: list[Path] = field(default_factory=list)
    own_output: dict[str, list[Path]] = field(default_factory=dict)


def scan_input(root: Path) -> InputScan:
    """Sort every file under ``root`` (recursively) into series and the files not used.

    The files not used are srnode's own output, unreadable DICOM files and non-DICOM files.
    Part-10 files and bare data sets without the Part-10 header are both read.  srnode's own
    output is recognised exactly as the node recognises it when receiving
    (:func:`dicom_node.receive.header.header_from_dataset`).
    """
    from dicom_node.derive.series import NotDicomError, SeriesError, read_dataset
    from dicom_node.receive.header import header_from_dataset

    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    scan = InputScan()
    for path in files:
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            header = header_from_dataset(ds)
        except NotDicomError:
            scan.not_dicom.append(path)
            continue
        except SeriesError as exc:
            scan.unreadable.append((path, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - malformed values: named, never fatal
            scan.unreadable.append((path, f"{path.name}: {exc}"))
            continue
        target = scan.own_output if header.produced_by_node else scan.series
        target.setdefault(header.series_instance_uid, []).append(path)
    return scan


def find_series(root: Path) -> dict[str, list[Path]]:
    """Group every readable DICOM file under ``root`` (any names, recursively) by series UID."""
    scan = scan_input(root)
    return {**scan.series, **scan.own_output}


class EnhanceIncompleteError(EnhanceError):
    """Some files or series were skipped; the others were written (:attr:`written`)."""

    def __init__(self, problems: list[str], written: dict[str, list[Path]]) -> None:
        super().__init__("skipped:\n  " + "\n  ".join(problems))
        self.problems = problems
        self.written = written


def _prepare_output(output_dir: Path) -> None:
    """Create the output folder or refuse it with a clear :class:`EnhanceError`."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnhanceError(f"cannot create the output folder {output_dir}: {exc}") from exc
    if not output_dir.is_dir():
        raise EnhanceError(f"output path {output_dir} is not a folder")


def _derive_into(
    paths: Sequence[Path], config: Config, output_dir: Path, *, mode: str, scale: int,
    model: str,
) -> WrittenSeries:
    """Derive one series all or nothing: into a hidden partial folder, then renamed.

    The slabs are written into ``.<source series UID>.partial``; the folder is renamed to the
    derived Series Instance UID only once every instance is complete, so an interrupted run
    leaves no folder that looks like a derived series (and the next run starts afresh).

    Raises
    ------
    EnhanceError
        The files cannot be written (disk full, permissions); nothing of the series is left.
    """
    import shutil

    from dicom_node.derive.series import SeriesError

    partial = output_dir / f".{scan_key(paths)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        w = derive_series_to(paths, config, partial, mode=mode, scale=scale, model=model)
        if w.gate in ("hold", "skip"):
            shutil.rmtree(partial, ignore_errors=True)
            return w
        final = output_dir / w.derived_series_uid
        partial.rename(final)
    except (OSError, SeriesError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, SeriesError):
            raise
        raise EnhanceError(
            f"cannot write derived series to {output_dir}: "
            f"{exc.strerror or exc}; nothing of it was left there"
        ) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    w.paths = [final / p.name for p in w.paths]
    return w


def scan_key(paths: Sequence[Path]) -> str:
    """A folder-safe name for one input series (a hash of its files)."""
    import hashlib

    h = hashlib.sha256("\n".join(sorted(str(p) for p in paths)).encode()).hexdigest()
    return h[:24]


def enhance_path(
    input_path: Path,
    output_dir: Path,
    config: Config,
    *,
    mode: str = "slice",
    scale: int = 2,
    model: str = "auto",
    progress: bool = True,
    keep_going: bool = False,
) -> dict[str, list[Path]]:
    """``srnode enhance``: derive every series found under ``input_path`` into ``output_dir``.

    Every unreadable file and every series that is not enhanced is named on stderr.  srnode's
    own output found under ``input_path`` is skipped (as the node skips it) and only noted.
    Each derived series is written all or nothing.

    Parameters
    ----------
    keep_going
        Return normally although files or series were skipped (they are still named).

    Returns
    -------
    dict
        Derived series UID -> written files.

    Raises
    ------
    EnhanceIncompleteError
        Files or series were skipped (unless ``keep_going``); the rest was written.
    EnhanceError
        When no DICOM series was found, none could be enhanced, or the output cannot be
        written (then nothing partial is left).
    """
    from tqdm import tqdm

    from dicom_node.derive.series import SeriesError
    from dicom_node.heap import fix_mmap_threshold
    from sr_engine.errors import EngineError

    fix_mmap_threshold()  # freed slab arrays go back to the OS

    if not input_path.exists():
        raise EnhanceError(f"{input_path} does not exist")
    scan = scan_input(input_path)
    problems = [f"unreadable file {path}: {reason}" for path, reason in scan.unreadable]
    for uid, files in scan.own_output.items():
        print(f"note: series {uid} ({len(files)} files) is srnode's own output: not enhanced "
              "again", file=sys.stderr)
    for path in scan.not_dicom:
        print(f"note: {path} is not a DICOM file: ignored", file=sys.stderr)
    if not scan.series:
        if scan.own_output and not problems:
            return {}
        raise EnhanceError(
            f"no DICOM files found under {input_path}" if not problems
            else "nothing could be enhanced:\n  " + "\n  ".join(problems)
        )
    _prepare_output(output_dir)
    written: dict[str, list[Path]] = {}
    bar = tqdm(scan.series.items(), desc="series", unit="series", disable=not progress)
    for series_uid, paths in bar:
        try:
            d = _derive_into(paths, config, output_dir, mode=mode, scale=scale, model=model)
        except (SeriesError, EngineError, ValueError) as exc:
            folders = {p.parent for p in paths}
            nearby = [p.name for p, _ in scan.unreadable if p.parent in folders]
            hint = f" (unreadable files beside it: {', '.join(nearby)})" if nearby else ""
            problems.append(f"series {series_uid} not enhanced: {exc}{hint}")
            LOGGER.warning("series %s not enhanced: %s", series_uid, exc)
            continue
        for note in d.notes:
            print(f"note: series {series_uid}: {note}", file=sys.stderr)
        if d.gate == "hold":
            problems.append(f"series {series_uid}: held by the safety gate ({d.gate_reason})")
            continue
        if d.gate == "skip":  # [safety] on_fallback = "skip": wanted, not a problem
            print(f"note: series {series_uid}: {d.gate_reason}", file=sys.stderr)
            continue
        written[d.derived_series_uid] = d.paths
    if not written:
        raise EnhanceError("nothing could be enhanced:\n  " + "\n  ".join(problems))
    if problems and not keep_going:
        raise EnhanceIncompleteError(problems, written)
    for e in problems:
        print(f"warning: {e}", file=sys.stderr)
    return written


def _nifti_case(path: Path) -> tuple[str, np.ndarray, tuple[float, float, float], str]:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.get_fdata(dtype=np.float32))  # (x, y, z) RAS
    zooms = img.header.get_zooms()[:3]
    volume = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # (z, y, x)
    return path.name, volume, (float(zooms[2]), float(zooms[1]), float(zooms[0])), "MR"


def evaluate_paths(
    paths: Sequence[Path], *, mode: str, scale: int, model: str, weights_dir: Path | None = None,
    self_ensemble: bool | None = None, degradations: str = "nominal", max_slices: int = 16,
    adapt_seconds: float = 0.0,
) -> dict[str, Any]:
    """``srnode evaluate``: PSNR/SSIM of ``model`` against its baseline on DICOM/NIfTI inputs.

    ``degradations`` ``nominal`` degrades each input with the documented nominal operator
    (:func:`sr_engine.evaluation.evaluate_volumes`); ``families`` / ``all`` with every trained
    family (and every operator outside them), the site's own check of the promise "never worse
    than interpolation" (:func:`sr_engine.evaluation.evaluate_robustness`, at most
    ``max_slices`` slices per series in slice mode).
    """
    from dicom_node.derive.series import SeriesError, load_series
    from sr_engine.evaluation import evaluate_robustness, evaluate_volumes

    cases: list[tuple[str, np.ndarray, tuple[float, float, float], str]] = []
    for p in paths:
        if p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
            cases.append(_nifti_case(p))
            continue
        for series_uid, files in find_series(p).items():
            try:
                s = load_series(files)
                name = files[0].name if len(files) == 1 else f"{p.name}:{series_uid[-12:]}"
                cases.append((name, s.volume, s.spacing, s.modality))
            except SeriesError:
                for f in files:  # unrelated single images that share a series UID
                    try:
                        s = load_series([f])
                    except SeriesError as exc:
                        LOGGER.warning("skipping %s: %s", f.name, exc)
                        continue
                    cases.append((f.name, s.volume, s.spacing, s.modality))
    if not cases:
        raise EnhanceError("no evaluable CT/MR images found")
    if degradations != "nominal":
        try:
            return evaluate_robustness(cases, mode, scale, model, degradations,
                                       weights_dir=weights_dir, self_ensemble=self_ensemble,
                                       max_slices=max_slices, adapt_seconds=adapt_seconds)
        except ValueError as exc:
            raise EnhanceError(str(exc)) from exc
    return evaluate_volumes(cases, mode=mode, scale=scale, model=model, weights_dir=weights_dir,
                            self_ensemble=self_ensemble)
