"""Build realistic short CT/MR series for tests from the images pydicom ships.

Each call makes a fresh patient-study-series with new Study, Series, Frame of Reference and SOP
Instance UIDs, slices stacked along the slice normal with consistent ImagePositionPatient,
SliceThickness, SpacingBetweenSlices and SliceLocation.  Slice ``k`` shows the source image moved
``k`` pixels diagonally, so slices differ but stay anatomically plausible.  ``rows`` decimates to a
smaller matrix (keeping the field of view) to keep tests fast.  ``enhanced=True`` converts the
stack to one Legacy Converted Enhanced CT/MR instance with highdicom.

These pydicom test images are evaluation data only: never train on them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds
from skimage.transform import resize

CT_SOURCE = "CT_small.dcm"
MR_SOURCE = "MR_small.dcm"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _ds(value: float) -> str:
    """Format a float as a DS string of at most 16 characters."""
    return format_number_as_ds(float(value))


def source_path(name: str) -> Path:
    """Return the path of a pydicom test file (``CT_small.dcm``, ``emri_small.dcm``, ...)."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return Path(str(path))


def _decimate(ds: Dataset, pixels: np.ndarray, rows: int) -> np.ndarray:
    """Resample to ``rows`` x proportional columns, keeping the field of view; updates ``ds``."""
    old_r, old_c = pixels.shape
    cols = max(1, round(old_c * rows / old_r))
    out = resize(
        pixels.astype(np.float64), (rows, cols), order=1, anti_aliasing=True, preserve_range=True
    )
    dy, dx = (float(v) for v in ds.PixelSpacing)
    ndy, ndx = dy * old_r / rows, dx * old_c / cols
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    ipp = ipp + iop[:3] * 0.5 * (ndx - dx) + iop[3:] * 0.5 * (ndy - dy)
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.PixelSpacing = [_ds(ndy), _ds(ndx)]
    ds.Rows, ds.Columns = rows, cols
    return np.rint(out).astype(pixels.dtype)


def _make_series(
    out_dir: Path,
    source_name: str,
    n_slices: int,
    rows: int | None,
    transfer_syntax: str,
    enhanced: bool,
    spacing: float | None,
    thickness: float | None,
    prefix: str,
) -> list[Path]:
    """Write the stack; see :func:`make_ct_series` for the parameters."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source_path(source_name))
    base = template.pixel_array
    if rows is not None:
        base = _decimate(template, base, rows)
    thickness = float(template.SliceThickness) if thickness is None else float(thickness)
    spacing = thickness if spacing is None else float(spacing)
    iop = np.array([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array([float(v) for v in template.ImagePositionPatient])
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    datasets: list[Dataset] = []
    for k in range(n_slices):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        pos = ipp0 + k * spacing * normal
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.SliceLocation = _ds(float(pos @ normal))
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(spacing)
        pixels = np.roll(base, (k, k), axis=(0, 1))
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.file_meta = copy.deepcopy(template.file_meta)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    if enhanced:
        datasets = [_to_legacy_enhanced(datasets)]
    paths: list[Path] = []
    for i, ds in enumerate(datasets):
        ts = UID(transfer_syntax)
        if ts not in UNCOMPRESSED:
            ds.compress(ts, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        path = out_dir / f"{prefix}{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _to_legacy_enhanced(datasets: Sequence[Dataset]) -> Dataset:
    """Convert a single-frame stack to one Legacy Converted Enhanced CT/MR instance."""
    cls = (
        hd.legacy.LegacyConvertedEnhancedCTImage
        if datasets[0].Modality == "CT"
        else hd.legacy.LegacyConvertedEnhancedMRImage
    )
    image = cls(
        legacy_datasets=list(datasets),
        series_instance_uid=generate_uid(),
        series_number=int(datasets[0].get("SeriesNumber", 1) or 1),
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    out = Dataset(image)
    out.file_meta = FileMetaDataset(image.file_meta)
    return out


def make_ct_series(
    out_dir: Path,
    n_slices: int = 8,
    rows: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    spacing: float | None = None,
    thickness: float | None = None,
) -> list[Path]:
    """Write a CT series built from pydicom's ``CT_small.dcm`` and return the file paths.

    Parameters
    ----------
    out_dir
        Folder to write into (created if needed).
    n_slices
        Number of slices (frames when ``enhanced``).
    rows
        Decimate to this many rows (columns in proportion), keeping the field of view.
    transfer_syntax
        Transfer syntax UID of the written files (explicit/implicit VR LE, RLE Lossless,
        JPEG 2000 Lossless, ...).
    enhanced
        Write one Legacy Converted Enhanced CT instance instead of single-frame instances.
    spacing, thickness
        Slice spacing and thickness in mm (default: the source's 5 mm thickness for both).
    """
    return _make_series(
        out_dir, CT_SOURCE, n_slices, rows, transfer_syntax, enhanced, spacing, thickness, "CT"
    )


def make_mr_series(
    out_dir: Path,
    n_slices: int = 8,
    rows: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    spacing: float | None = None,
    thickness: float | None = None,
) -> list[Path]:
    """Write an MR series built from pydicom's ``MR_small.dcm``; see :func:`make_ct_series`."""
    return _make_series(
        out_dir, MR_SOURCE, n_slices, rows, transfer_syntax, enhanced, spacing, thickness, "MR"
    )


def make_enhanced_ct_in_hu(out_dir: Path) -> Path:
    """pydicom's ``eCT_Supplemental.dcm`` (2 frames) relabelled as Hounsfield units.

    As shipped, the file is a perfusion-style map (Rescale Type US and a Real World Value
    Mapping in ml/100ml/s) that srnode refuses; without the mapping and with Rescale Type HU it
    is an ordinary Enhanced CT Image.
    """
    ds = pydicom.dcmread(source_path("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared.RealWorldValueMappingSequence
    shared.PixelValueTransformationSequence[0].RescaleType = "HU"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eCT_HU.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
