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
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.config import Config, SafetyConfig
from dicom_node.derive.files import write_datasets
from sr_engine.api import ConsistencyReport, EnhanceRequest, EnhanceResult

LOGGER = logging.getLogger(__name__)

Gate = Literal["send", "warn", "hold"]


class EnhanceError(Exception):
    """Nothing could be enhanced (bad input, no usable series)."""


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

    def summary(self) -> dict[str, Any]:
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
        }


def safety_gate(
    consistency: ConsistencyReport, modality: str, safety: SafetyConfig
) -> tuple[Gate, str]:
    """Decide from the consistency figures whether a derived series may be sent.

    The absolute-error bounds are in Hounsfield units and apply to CT only (MR units are
    arbitrary); the PSNR bounds apply to every modality.

    Returns
    -------
    tuple
        ``("send" | "warn" | "hold", reason)``.
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
    if c.psnr < safety.warn_min_psnr:
        return "warn", f"consistency PSNR {c.psnr:.1f} dB < {safety.warn_min_psnr} dB"
    if modality == "CT" and c.mean_abs_error > safety.warn_mean_abs_error:
        return "warn", (f"consistency mean error {c.mean_abs_error:.1f} HU > "
                        f"{safety.warn_mean_abs_error} HU")
    return "send", "consistency within bounds"


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
    source = load_series(paths)
    seconds["loading"] = time.perf_counter() - t0

    stage("enhancing")
    t0 = time.perf_counter()
    request = EnhanceRequest(
        mode=mode,  # type: ignore[arg-type]
        scale=scale,
        model=model,
        device=config.engine.device,
        batch_size=config.engine.batch_size,
        tile_size=config.engine.tile_size,
        tile_overlap=config.engine.tile_overlap,
        output_spacing=output_spacing,
        self_ensemble=config.engine.self_ensemble_request,
    )
    result = enhance_volume(
        source.volume, source.spacing, source.slice_thickness, source.modality, request,
        weights_dir=Path(config.engine.weights_dir) if config.engine.weights_dir else None,
    )
    seconds["enhancing"] = time.perf_counter() - t0
    gate, reason = safety_gate(result.consistency, source.modality, config.safety)

    t0 = time.perf_counter()
    options = DerivationOptions.from_config(
        config.derived,
        __version__,
        description_suffix=" (CHECK)" if gate == "warn" else "",
        now=datetime.now(UTC),
        mode=mode,
        scale=scale,
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
    )


def find_series(root: Path) -> dict[str, list[Path]]:
    """Group every readable DICOM file under ``root`` (any names, recursively) by series UID."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, list[Path]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - not DICOM or unreadable: skip it
            continue
        groups.setdefault(uid, []).append(path)
    return groups


def enhance_path(
    input_path: Path,
    output_dir: Path,
    config: Config,
    *,
    mode: str = "slice",
    scale: int = 2,
    model: str = "auto",
    progress: bool = True,
) -> dict[str, list[Path]]:
    """``srnode enhance``: derive every series found under ``input_path`` into ``output_dir``.

    Returns
    -------
    dict
        Derived series UID -> written files.

    Raises
    ------
    EnhanceError
        When no DICOM series was found or none could be enhanced.
    """
    from tqdm import tqdm

    from dicom_node.derive.series import SeriesError
    from sr_engine.errors import EngineError

    if not input_path.exists():
        raise EnhanceError(f"{input_path} does not exist")
    groups = find_series(input_path)
    if not groups:
        raise EnhanceError(f"no DICOM files found under {input_path}")
    written: dict[str, list[Path]] = {}
    errors: list[str] = []
    bar = tqdm(groups.items(), desc="series", unit="series", disable=not progress)
    for series_uid, paths in bar:
        try:
            d = derive_series(paths, config, mode=mode, scale=scale, model=model)
        except (SeriesError, EngineError, ValueError) as exc:
            errors.append(f"series {series_uid}: {exc}")
            LOGGER.warning("series %s not enhanced: %s", series_uid, exc)
            continue
        if d.gate == "hold":
            errors.append(f"series {series_uid}: held by the safety gate ({d.gate_reason})")
            continue
        out = output_dir / d.derived_series_uid
        written[d.derived_series_uid] = write_datasets(d.datasets, out)
    if not written:
        raise EnhanceError("nothing could be enhanced:\n  " + "\n  ".join(errors))
    for e in errors:
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
    self_ensemble: bool | None = None,
) -> dict[str, Any]:
    """``srnode evaluate``: PSNR/SSIM of ``model`` against its baseline on DICOM/NIfTI inputs."""
    from dicom_node.derive.series import SeriesError, load_series
    from sr_engine.evaluation import evaluate_volumes

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
    return evaluate_volumes(cases, mode=mode, scale=scale, model=model, weights_dir=weights_dir,
                            self_ensemble=self_ensemble)
