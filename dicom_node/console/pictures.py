"""Before/after pictures of a job: the same slice of the source and derived series, windowed alike.

Rendered on demand from the stored files into 8-bit grey PNGs and cached under
``<storage_dir>/console-cache/job-<id>/<key>/`` (``key`` changes when any input file changes).
The pixels are the only content: no text, so no patient name or ID is ever burned in.

Rendering runs in one separate process (``spawn``) so that decoding and resampling never hold
the GIL of the node process, whose threads receive C-STOREs.

Pictures
--------
``before``, ``after``
    The representative (middle) slice of the source, and the derived slice nearest to the same
    position along the slice normal; both with the source's window (DICOM Window Center/Width,
    else a modality default: CT 40/400 HU, others the 1st-99th percentile).
``difference``
    Derived minus the source slice resampled to the derived matrix (bilinear); mid-grey is no
    change, white the derived series brighter.
``before-sagittal``, ``before-coronal``, ``after-sagittal``, ``after-coronal``
    Volume mode: central sagittal and coronal reformats, resampled to square pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import zlib
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

#: Every picture a job page can show.
KINDS = ("before", "after", "difference", "before-sagittal", "before-coronal",
         "after-sagittal", "after-coronal")
#: Default window (center, width) per modality when the source has none.
DEFAULT_WINDOWS = {"CT": (40.0, 400.0)}
#: The longest side of a reformat, in pixels.
MAX_REFORMAT_SIDE = 2048


#: Jobs whose pictures stay cached (the least recently rendered go first).
MAX_CACHED_JOBS = 200


class PictureUnavailableError(LookupError):
    """The job has no such picture (no derived series yet, or not a volume job)."""


class RenderError(RuntimeError):
    """The stored files could not be made into pictures (unreadable pixel data, ...)."""


@dataclass(frozen=True)
class RenderRequest:
    """Everything the render process needs for one job's pictures."""

    source: tuple[str, ...]
    derived: tuple[str, ...]
    reformats: bool
    out_dir: str


@dataclass
class Stack:
    """A series as a volume sorted along its slice normal."""

    volume: np.ndarray  # (slices, rows, columns), float32, rescaled (HU for CT)
    positions: np.ndarray  # position of each slice along the normal (mm)
    pixel_spacing: tuple[float, float]  # (row, column) spacing in mm
    window: tuple[float, float] | None  # from the DICOM header, if any
    modality: str


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D ``uint8`` array as an 8-bit greyscale PNG."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError("expected a 2-D uint8 image")
    height, width = image.shape
    rows = np.hstack([np.zeros((height, 1), np.uint8), image])  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def _first(value: Any) -> float | None:
    """The first number of a (multi-valued) DICOM element, or None."""
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) \
            else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _functional(ds: Any, frame: int, sequence: str, attribute: str) -> Any:
    """An attribute from the per-frame, then the shared functional groups, then the top level."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > index:
            inner = items[index].get(sequence)
            if inner is not None and len(inner) and attribute in inner[0]:
                return inner[0].get(attribute)
    return ds.get(attribute)


def load_stack(paths: list[str]) -> Stack:
    """Read a series (single- or multi-frame files) into a volume sorted along its normal."""
    import pydicom
    from pydicom.pixels import apply_rescale

    frames: list[np.ndarray] = []
    ipps: list[np.ndarray | None] = []
    orientation = None
    spacing = None
    window = None
    modality = ""
    for path in paths:
        ds = pydicom.dcmread(path)
        modality = modality or str(ds.get("Modality", ""))
        pixels = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            pixels = pixels.mean(axis=-1)
        stack = pixels.reshape((count, *pixels.shape[-2:]))
        for f in range(count):
            frames.append(stack[f])
            ipp = _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")
            ipps.append(np.asarray([float(v) for v in ipp]) if ipp is not None else None)
            if orientation is None:
                iop = _functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
                orientation = [float(v) for v in iop] if iop is not None else None
            if spacing is None:
                ps = _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")
                spacing = (float(ps[0]), float(ps[1])) if ps is not None else None
            if window is None:
                c = _first(_functional(ds, f, "FrameVOILUTSequence", "WindowCenter"))
                w = _first(_functional(ds, f, "FrameVOILUTSequence", "WindowWidth"))
                window = (c, w) if c is not None and w is not None and w > 0 else None
    shape = frames[0].shape
    keep = [i for i, fr in enumerate(frames) if fr.shape == shape]
    if orientation is not None and all(ipps[i] is not None for i in keep):
        normal = np.cross(orientation[:3], orientation[3:])
        pos = np.asarray([float(np.dot(ipps[i], normal)) for i in keep])
    else:
        pos = np.arange(len(keep), dtype=float)
    order = np.argsort(pos, kind="stable")
    volume = np.stack([frames[keep[i]] for i in order])
    return Stack(volume, pos[order], spacing or (1.0, 1.0), window, modality)


def choose_window(stack: Stack) -> tuple[float, float]:
    """The source's window: from its header, else the modality default, else percentiles."""
    if stack.window is not None:
        return stack.window
    if stack.modality in DEFAULT_WINDOWS:
        return DEFAULT_WINDOWS[stack.modality]
    low, high = np.percentile(stack.volume, [1.0, 99.0])
    return float((low + high) / 2), float(max(high - low, 1e-3))


def apply_window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``center +- width/2`` to 0..255."""
    center, width = window
    scaled = (image.astype(np.float32) - (center - width / 2)) / width
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling (values preserved)."""
    from skimage.transform import resize

    if image.shape == shape:
        return image
    return resize(image, shape, order=1, preserve_range=True, anti_aliasing=False).astype(
        np.float32)


def _reformats(stack: Stack) -> dict[str, np.ndarray]:
    """Central sagittal and coronal planes, superior up, resampled to square pixels."""
    vol = stack.volume
    steps = np.diff(stack.positions)
    dz = float(np.median(np.abs(steps))) if steps.size else 1.0
    dz = dz if dz > 0 else 1.0
    out = {}
    for name, plane, step in (("sagittal", vol[:, :, vol.shape[2] // 2], stack.pixel_spacing[0]),
                              ("coronal", vol[:, vol.shape[1] // 2, :], stack.pixel_spacing[1])):
        height = int(round(vol.shape[0] * dz / step)) if step > 0 else vol.shape[0]
        height = max(1, min(MAX_REFORMAT_SIDE, height))
        out[name] = _resize(plane[::-1], (height, plane.shape[1]))
    return out


def _write(out_dir: Path, name: str, image: np.ndarray) -> None:
    """Write one PNG atomically."""
    tmp = out_dir / f".{name}.png.tmp"
    tmp.write_bytes(png_bytes(image))
    os.replace(tmp, out_dir / f"{name}.png")


def render(request: RenderRequest) -> list[str]:
    """Render every picture of one job into ``request.out_dir`` (runs in the render process).

    Returns
    -------
    list[str]
        The pictures written (see :data:`KINDS`).
    """
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = load_stack(list(request.source))
    window = choose_window(source)
    middle = source.volume.shape[0] // 2
    before = source.volume[middle]
    _write(out_dir, "before", apply_window(before, window))
    written = ["before"]
    derived = load_stack(list(request.derived)) if request.derived else None
    if derived is not None:
        nearest = int(np.argmin(np.abs(derived.positions - source.positions[middle])))
        after = derived.volume[nearest]
        _write(out_dir, "after", apply_window(after, window))
        diff = after - _resize(before, after.shape)
        limit = max(float(np.percentile(np.abs(diff), 99.5)), window[1] / 200.0, 1e-6)
        grey = np.clip(diff / limit, -1.0, 1.0) * 127.0 + 128.0
        _write(out_dir, "difference", grey.astype(np.uint8))
        written += ["after", "difference"]
    if request.reformats:
        stacks = [("before", source)] + ([("after", derived)] if derived is not None else [])
        for label, stack in stacks:
            if stack.volume.shape[0] < 2:
                continue
            for plane, image in _reformats(stack).items():
                _write(out_dir, f"{label}-{plane}", apply_window(image, window))
                written.append(f"{label}-{plane}")
    (out_dir / "done.json").write_text(json.dumps(written))
    return written


def _cache_key(paths: list[Path]) -> str:
    """Changes whenever an input file is added, removed or rewritten."""
    h = hashlib.sha1(usedforsecurity=False)
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class PictureService:
    """Renders and caches the pictures of jobs (one render process, one render per job at once).

    Parameters
    ----------
    cache_root
        Folder for the cached PNGs (``<storage_dir>/console-cache``).
    executor
        Runs :func:`render`; by default a one-process ``spawn`` pool started on first use.
    max_jobs
        Jobs whose pictures stay cached.
    """

    def __init__(self, cache_root: Path, executor: Executor | None = None,
                 max_jobs: int = MAX_CACHED_JOBS) -> None:
        self.cache_root = cache_root
        self.max_jobs = max_jobs
        self._executor = executor
        self._lock = threading.Lock()
        self._job_locks: dict[int, threading.Lock] = {}

    def _pool(self) -> Executor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(max_workers=1,
                                                     mp_context=get_context("spawn"))
            return self._executor

    @staticmethod
    def available(source: list[Path], derived: list[Path], volume: bool) -> list[str]:
        """The pictures a job can have, without rendering them."""
        if not source:
            return []
        kinds = ["before"]
        if derived:
            kinds += ["after", "difference"]
        if volume:
            for plane in ("sagittal", "coronal"):
                kinds += [f"before-{plane}"] + ([f"after-{plane}"] if derived else [])
        return kinds

    def picture(self, job_id: int, kind: str, source: list[Path], derived: list[Path],
                volume: bool) -> Path:
        """The PNG of one picture, rendered now if it is not cached.

        Raises
        ------
        PictureUnavailableError
            If the job has no such picture.
        RenderError
            If the stored files could not be rendered.
        """
        if kind not in self.available(source, derived, volume):
            raise PictureUnavailableError(f"job {job_id} has no {kind!r} picture")
        try:
            key = _cache_key([*source, *derived])
        except FileNotFoundError as exc:
            raise PictureUnavailableError(f"job {job_id}: a stored file is gone") from exc
        out_dir = self.cache_root / f"job-{job_id}" / key
        target = out_dir / f"{kind}.png"
        with self._lock:
            job_lock = self._job_locks.setdefault(job_id, threading.Lock())
        with job_lock:
            if not (out_dir / "done.json").exists():
                request = RenderRequest(tuple(map(str, source)), tuple(map(str, derived)),
                                        volume, str(out_dir))
                try:
                    self._pool().submit(render, request).result()
                except BrokenProcessPool as exc:
                    self.close()  # a fresh render process next time
                    raise RenderError(f"job {job_id}: the render process died") from exc
                except Exception as exc:  # noqa: BLE001 - whatever the files made render raise
                    raise RenderError(f"job {job_id}: {type(exc).__name__}: {exc}") from exc
                self._prune(out_dir)
        if not target.exists():
            raise PictureUnavailableError(f"job {job_id}: the {kind!r} picture could not be made")
        return target

    def _prune(self, keep: Path) -> None:
        """Drop older renders of the same job and the least recently rendered jobs."""
        for other in keep.parent.iterdir():
            if other != keep:
                shutil.rmtree(other, ignore_errors=True)
        jobs = sorted((p for p in self.cache_root.iterdir() if p.is_dir()),
                      key=lambda p: p.stat().st_mtime)
        for old in jobs[:max(0, len(jobs) - self.max_jobs)]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Stop the render process."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
