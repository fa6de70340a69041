"""Load a received CT/MR series into a geometry-sorted volume in modality units.

:func:`load_series` accepts classic single-frame CT/MR Image Storage instances or enhanced
multi-frame instances (Enhanced CT/MR, Legacy Converted Enhanced CT/MR), in any transfer syntax
that pydicom can decode with the installed plugins (pylibjpeg, openjpeg, RLE, GDCM).  Slices are
sorted by their position along the slice normal; anything that would make the volume ambiguous
(mixed series, inconsistent orientation, matrix or pixel spacing, non-uniform slice spacing, missing
geometry, duplicate positions, colour images, no pixel data) raises :class:`SeriesError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.codes import CLASSIC_IMAGE_STORAGE, ENHANCED_IMAGE_STORAGE, LOSSY_TRANSFER_SYNTAXES
from dicom_node.derive.functional_groups import first_group_item
from sr_engine.normalise import MagnitudeStats

LOGGER = logging.getLogger(__name__)

#: Largest difference between direction-cosine components still counted as the same orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Relative tolerance on pixel spacing between slices.
PIXEL_SPACING_RTOL = 1e-4
#: Relative tolerance on the slice gaps (deviation from the median gap).
SPACING_RTOL = 0.02
#: Absolute tolerance in mm on positions (duplicates, uniformity, collinearity).
POSITION_ATOL_MM = 1e-3


class SeriesError(ValueError):
    """The instances do not form one loadable, geometrically consistent CT/MR series."""


@dataclass(frozen=True)
class SourceRef:
    """The source instance (and frame) behind one slice of the volume.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid
        The instance's SOP Class UID and SOP Instance UID.
    frame_number
        1-based frame number within an enhanced (multi-frame) instance; ``None`` for single-frame.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass
class SourceSeries:
    """A loaded series, sorted along the slice normal (index 0 = lowest position).

    Attributes
    ----------
    datasets
        Per slice, the source header (pixel data removed once decoded); for an enhanced source
        the one multi-frame dataset, repeated for every frame.
    volume
        float32 ``(z, y, x)`` in modality units (rescale slope/intercept applied); ``None`` for
        a series opened for streaming (:func:`open_series`), whose slices are read slab by slab
        with :func:`read_slab`.
    spacing
        ``(dz, dy, dx)`` in mm: centre-to-centre slice spacing, row spacing, column spacing.
    slice_thickness
        Nominal slice thickness in mm.
    orientation
        Image Orientation (Patient): row direction cosines then column direction cosines.
    positions
        ``(z, 3)`` Image Position (Patient) of each slice in mm.
    modality
        ``"CT"`` or ``"MR"``.
    is_enhanced
        Whether the source is a multi-frame (enhanced or legacy converted enhanced) instance.
    source_refs
        Per slice, the source instance (and frame) it came from.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Identity of the source series.
    rescale_slopes, rescale_intercepts
        Per slice, the Rescale Slope and Intercept used (1 and 0 when absent).
    has_rescale
        Whether the source carries Rescale Slope/Intercept (CT always does).
    window_centers, window_widths
        Per slice, the Window Center / Width values (empty tuples when absent).
    photometric_interpretation
        ``MONOCHROME1`` or ``MONOCHROME2``.
    bits_stored, pixel_representation
        Of the stored source pixels.
    lossy
        Whether any source instance was lossy compressed (attribute or transfer syntax).
    slice_thickness_present
        Whether the source states a Slice Thickness (Type 2: it may be empty); when not,
        :attr:`slice_thickness` is only the slice spacing used for processing.
    instance_numbers
        Per slice, the source Instance Number (single-frame) or frame number (multi-frame);
        ``None`` where absent.
    padding_value
        The source's Pixel Padding Value (stored units), or ``None``.
    padding_mask
        ``(z, y, x)`` bool, true where a source pixel is padding (Pixel Padding Value, up to
        Pixel Padding Range Limit); ``None`` when the source has no padding.  Padding voxels of
        :attr:`volume` hold :attr:`padding_fill` instead of the padding value, so that neither
        the enhancement nor its consistency check sees the artificial edge.
    padding_fill
        Modality value written into padding voxels of :attr:`volume` (the lowest non-padding
        value).
    notes
        What loading left out (slice mode: images that do not belong to the main stack).
    files
        Per slice, the file it is read from (streamed series).
    value_min, value_max
        Smallest and largest value of the volume (padding filled), in modality units.
    magnitudes
        ``|value|`` statistics of the volume for the MR intensity mapping (streamed MR series).
    has_padding
        Whether any slice has padding (:attr:`padding_mask` of a streamed series is ``None``).
    slice_locations
        Per slice, the source's Slice Location value (``None`` or ``""`` when absent).
    """

    datasets: Sequence[Dataset]
    volume: np.ndarray | None
    spacing: tuple[float, float, float]
    slice_thickness: float
    orientation: tuple[float, float, float, float, float, float]
    positions: np.ndarray
    modality: str
    is_enhanced: bool
    source_refs: list[SourceRef]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    rescale_slopes: list[float] = field(default_factory=list)
    rescale_intercepts: list[float] = field(default_factory=list)
    has_rescale: bool = True
    window_centers: list[tuple[float, ...]] = field(default_factory=list)
    window_widths: list[tuple[float, ...]] = field(default_factory=list)
    photometric_interpretation: str = "MONOCHROME2"
    bits_stored: int = 16
    pixel_representation: int = 0
    lossy: bool = False
    slice_thickness_present: bool = True
    instance_numbers: list[int | None] = field(default_factory=list)
    padding_value: int | None = None
    padding_mask: np.ndarray | None = None
    padding_fill: float = 0.0
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    value_min: float = 0.0
    value_max: float = 0.0
    magnitudes: MagnitudeStats | None = None
    has_padding: bool = False
    slice_locations: list[object] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` of the volume, also when it is streamed."""
        return (len(self.source_refs), self.rows, self.cols)

    @property
    def rows(self) -> int:
        """Rows of every slice."""
        return int(self.datasets[0].get("Rows", 0)) if self.volume is None else int(
            self.volume.shape[1])

    @property
    def cols(self) -> int:
        """Columns of every slice."""
        return int(self.datasets[0].get("Columns", 0)) if self.volume is None else int(
            self.volume.shape[2])

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: cross product of the row and column direction cosines."""
        row = np.asarray(self.orientation[:3], dtype=np.float64)
        col = np.asarray(self.orientation[3:], dtype=np.float64)
        n = np.cross(row, col)
        return n / np.linalg.norm(n)

    @property
    def slice_offsets(self) -> list[float]:
        """Position of each slice centre along the normal, relative to slice 0, in mm."""
        d = (self.positions - self.positions[0]) @ self.normal
        return [float(v) for v in d]

    @property
    def num_slices(self) -> int:
        """Number of slices (frames) in the volume."""
        return len(self.source_refs)


class SourceHeaders(Sequence[Dataset]):
    """Per-slice source headers of a streamed series, held one slab at a time.

    A header is about 0.1 MB of Python objects: holding 1,500 of them would make memory grow
    with the series.  The first slice's header is kept; the slab being processed is held by
    :func:`read_slab` (which reads those files anyway); any other is read again on demand.
    """

    def __init__(self, first: Dataset, paths: Sequence[Path]) -> None:
        self._first = first
        self._paths = list(paths)
        self._held: dict[int, Dataset] = {}

    def __len__(self) -> int:
        """Number of slices."""
        return len(self._paths)

    @overload
    def __getitem__(self, index: int) -> Dataset: ...

    @overload
    def __getitem__(self, index: slice) -> list[Dataset]: ...

    def __getitem__(self, index: int | slice) -> Dataset | list[Dataset]:
        """The header of slice ``index`` (without pixel data)."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        j = index + len(self) if index < 0 else index
        if not 0 <= j < len(self):
            raise IndexError(index)
        if j in self._held:
            return self._held[j]
        if j == 0:
            return self._first
        return read_dataset(self._paths[j], stop_before_pixels=True)

    def hold(self, headers: dict[int, Dataset]) -> None:
        """Keep these headers (slice index -> header) until the next call."""
        self._held = headers


@dataclass
class _Frame:
    """One slice (single-frame instance or one frame of a multi-frame instance) before sorting."""

    ds: Dataset
    ref: SourceRef
    pixels: np.ndarray | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float
    intercept: float
    has_rescale: bool
    centers: tuple[float, ...]
    widths: tuple[float, ...]
    number: int | None = None
    padding: np.ndarray | None = None
    label: str = ""
    path: Path | None = None
    shape: tuple[int, ...] = ()
    stats: _FrameStats | None = None


@dataclass
class _FrameStats:
    """Value statistics of one frame, kept when its pixels are dropped (streaming)."""

    low: float  # smallest non-padding value (inf: all padding)
    high: float  # largest non-padding value (-inf: all padding)
    padding_voxels: int
    magnitudes: MagnitudeStats | None


def _floats(value: object) -> tuple[float, ...]:
    """Return a DS/FD value (single or multi-valued, possibly empty) as a tuple of floats."""
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return (float(value),)  # type: ignore[arg-type]
    return tuple(float(v) for v in value)  # type: ignore[union-attr]


def _int_or_none(value: object) -> int | None:
    """Return an IS/US value as ``int``, or ``None`` when absent or unreadable."""
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _padding(ds: Dataset, pixels: np.ndarray) -> np.ndarray | None:
    """Mask of the stored pixels that are Pixel Padding Value (up to the Range Limit), if any."""
    pad = _int_or_none(ds.get("PixelPaddingValue"))
    if pad is None:
        return None
    limit = _int_or_none(ds.get("PixelPaddingRangeLimit"))
    lo, hi = (pad, pad) if limit is None else (min(pad, limit), max(pad, limit))
    mask = (pixels >= lo) & (pixels <= hi)
    return mask if mask.any() else None


def _check_pixels_present(ds: Dataset, path: Path) -> None:
    """Refuse instances without grayscale pixel data."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SeriesError(f"{path.name}: no pixel data")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).upper()
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(
            f"{path.name}: colour image (SamplesPerPixel {spp}, PhotometricInterpretation {pi!r});"
            " only grayscale CT/MR is supported"
        )


#: CT Rescale Type values accepted: Hounsfield units (absent: HU, as the CT Image IOD implies)
#: and US (unspecified, which scanners write for HU-calibrated data; kept as US in the output).
_HU_RESCALE_TYPES = ("", "HU", "US")


def _image_type(ds: Dataset) -> list[str]:
    """Image Type values, upper case (also Frame Type of an enhanced instance's first frame)."""
    values = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    frame_type = first_group_item(ds, 0, "MRImageFrameTypeSequence") or first_group_item(
        ds, 0, "CTImageFrameTypeSequence")
    if frame_type is not None:
        values += [str(v).strip().upper() for v in (frame_type.get("FrameType") or [])]
    return values


def _check_enhanceable_content(ds: Dataset, path: Path, modality: str, enhanced: bool) -> None:
    """Refuse content that enhancement would make wrong, with the reason.

    - Siemens MOSAIC images (Image Type MOSAIC): one stored image holds a grid of slices; once
      resampled as one image, the tiles cannot be split into slices again.
    - CT not in Hounsfield units (Rescale Type other than HU, or a Real World Value Mapping in
      other units, e.g. a perfusion map in ml/100ml/s): the engine, the physical floor and the
      derived series all assume HU.
    """
    if "MOSAIC" in _image_type(ds):
        raise SeriesError(
            f"{path.name}: Siemens MOSAIC image (Image Type MOSAIC): its tiles are separate "
            "slices that cannot be split again after enhancement; not enhanced"
        )
    if modality != "CT":
        return
    types = {str(ds.get("RescaleType", "") or "").strip().upper()}
    mappings = list(ds.get("RealWorldValueMappingSequence") or [])
    if enhanced:
        for i in range(int(ds.get("NumberOfFrames", 1) or 1)):
            pvt = first_group_item(ds, i, "PixelValueTransformationSequence")
            if pvt is not None:
                types.add(str(pvt.get("RescaleType", "") or "").strip().upper())
            rwvm = first_group_item(ds, i, "RealWorldValueMappingSequence")
            if rwvm is not None:
                mappings.append(rwvm)
    other = sorted(t for t in types if t not in _HU_RESCALE_TYPES)
    if other:
        raise SeriesError(
            f"{path.name}: CT values are not in Hounsfield units (Rescale Type {other[0]}); "
            "parametric maps are not enhanced"
        )
    for mapping in mappings:
        units = mapping.get("MeasurementUnitsCodeSequence") or []
        code = str(units[0].get("CodeValue", "") or "") if units else ""
        if code and code.lower() != "[hnsf'u]":
            raise SeriesError(
                f"{path.name}: CT values are mapped to {code} (Real World Value Mapping), not "
                "Hounsfield units; parametric maps are not enhanced"
            )


#: pydicom's decoder logger: it logs every failed plugin attempt as an ERROR with a traceback,
#: even when the next plugin then decodes the frame.
_DECODER_LOGGER = "pydicom.pixels.decoders.base"


class _PluginAttemptFilter(logging.Filter):
    """Turn pydicom's per-plugin decoding failures into one-line DEBUG records.

    If every plugin fails, pydicom raises with all their messages and :func:`_decode` reports
    that as a :class:`SeriesError`; a single plugin failing is no error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop records logged with an exception by pydicom's plugin loop; log one DEBUG line."""
        if record.exc_info and record.funcName == "_decode_frame":
            LOGGER.debug("decoder plugin attempt failed: %s", record.getMessage())
            return False
        return True


def quiet_decoder_attempts() -> None:
    """Install :class:`_PluginAttemptFilter` on pydicom's decoder logger (once per process)."""
    logger = logging.getLogger(_DECODER_LOGGER)
    if not any(isinstance(f, _PluginAttemptFilter) for f in logger.filters):
        logger.addFilter(_PluginAttemptFilter())


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Decode the stored pixel values, refusing undecodable data with :class:`SeriesError`."""
    quiet_decoder_attempts()
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or unsupported pixel data
        raise SeriesError(f"{path.name}: cannot decode pixel data: {exc}") from exc
    return np.asarray(arr)


def _classic_frames(ds: Dataset, path: Path) -> list[_Frame]:
    """Describe a single-frame CT/MR image instance."""
    ipp = _floats(ds.get("ImagePositionPatient"))
    iop = _floats(ds.get("ImageOrientationPatient"))
    ps = _floats(ds.get("PixelSpacing"))
    if len(ipp) != 3 or len(iop) != 6 or len(ps) != 2:
        raise SeriesError(
            f"{path.name}: missing geometry (Image Position/Orientation (Patient) or Pixel Spacing)"
        )
    pixels = _decode(ds, path)
    if pixels.ndim != 2:
        raise SeriesError(f"{path.name}: expected one frame, got pixel array shape {pixels.shape}")
    has_rescale = "RescaleSlope" in ds and ds.RescaleSlope not in (None, "")
    if not has_rescale and ds.get("ModalityLUTSequence"):
        # A Modality LUT instead of rescale: apply it; the volume is then in modality units.
        pixels = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    thickness = _floats(ds.get("SliceThickness"))
    return [
        _Frame(
            ds=ds,
            ref=SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None),
            pixels=pixels,
            position=np.asarray(ipp, dtype=np.float64),
            orientation=np.asarray(iop, dtype=np.float64),
            pixel_spacing=(ps[0], ps[1]),
            thickness=thickness[0] if thickness else None,
            slope=float(ds.RescaleSlope) if has_rescale else 1.0,
            intercept=float(ds.get("RescaleIntercept", 0) or 0) if has_rescale else 0.0,
            has_rescale=has_rescale,
            centers=_floats(ds.get("WindowCenter")),
            widths=_floats(ds.get("WindowWidth")),
            number=_int_or_none(ds.get("InstanceNumber")),
            padding=_padding(ds, pixels),
            label=path.name,
            path=path,
            shape=tuple(pixels.shape),
        )
    ]


def _enhanced_frames(ds: Dataset, path: Path) -> list[_Frame]:
    """Describe every frame of an enhanced or legacy converted enhanced instance."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = _decode(ds, path)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != n:
        raise SeriesError(
            f"{path.name}: pixel array shape {pixels.shape} does not match {n} frames"
        )
    frames: list[_Frame] = []
    for i in range(n):
        pos = first_group_item(ds, i, "PlanePositionSequence")
        ori = first_group_item(ds, i, "PlaneOrientationSequence")
        meas = first_group_item(ds, i, "PixelMeasuresSequence")
        ipp = _floats(pos.get("ImagePositionPatient")) if pos is not None else ()
        iop = _floats(ori.get("ImageOrientationPatient")) if ori is not None else ()
        ps = _floats(meas.get("PixelSpacing")) if meas is not None else ()
        if len(ipp) != 3 or len(iop) != 6 or len(ps) != 2:
            raise SeriesError(
                f"{path.name}: frame {i + 1} is missing geometry (Plane Position, Plane Orientation"
                " or Pixel Measures functional group)"
            )
        thickness = _floats(meas.get("SliceThickness")) if meas is not None else ()
        pvt = first_group_item(ds, i, "PixelValueTransformationSequence")
        has_rescale = pvt is not None and pvt.get("RescaleSlope") not in (None, "")
        voi = first_group_item(ds, i, "FrameVOILUTSequence")
        frames.append(
            _Frame(
                ds=ds,
                ref=SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), i + 1),
                pixels=pixels[i],
                position=np.asarray(ipp, dtype=np.float64),
                orientation=np.asarray(iop, dtype=np.float64),
                pixel_spacing=(ps[0], ps[1]),
                thickness=thickness[0] if thickness else None,
                slope=float(pvt.RescaleSlope) if has_rescale else 1.0,  # type: ignore[union-attr]
                intercept=float(pvt.get("RescaleIntercept", 0) or 0) if has_rescale else 0.0,  # type: ignore[union-attr]
                has_rescale=has_rescale,
                centers=_floats(voi.get("WindowCenter")) if voi is not None else (),
                widths=_floats(voi.get("WindowWidth")) if voi is not None else (),
                number=i + 1,
                padding=_padding(ds, pixels[i]),
                label=f"{path.name} frame {i + 1}",
                path=path,
                shape=tuple(pixels[i].shape),
            )
        )
    return frames


class NotDicomError(SeriesError):
    """The file is not DICOM at all (no Part-10 header and no DICOM data set)."""


#: Transfer syntax of a data set stored without File Meta Information, by its encoding
#: ``(is_implicit_VR, is_little_endian)``.
_ENCODING_TS = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM file: a Part-10 file, or a bare data set without the Part-10 header.

    A bare data set (no preamble, no ``DICM``, no File Meta Information, as some archives and
    exports write) is read when it holds the SOP Class, SOP Instance and Series Instance UIDs;
    its Transfer Syntax UID is set from the encoding found.

    Raises
    ------
    NotDicomError
        The file is no DICOM data set.
    SeriesError
        A DICOM file that cannot be read or whose header is incomplete (e.g. truncated).
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        part10 = True
    except InvalidDicomError:
        part10 = False
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on non-DICOM bytes
            raise NotDicomError(f"{path.name}: not a readable DICOM file: not DICOM") from exc
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise SeriesError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    required = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")
    try:
        missing = [k for k in required if not ds.get(k)]
    except Exception as exc:  # noqa: BLE001 - undecodable element values
        raise SeriesError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    if missing:
        if not part10:
            raise NotDicomError(f"{path.name}: not a readable DICOM file: not DICOM")
        raise SeriesError(
            f"{path.name}: incomplete DICOM header (truncated file?): no {', '.join(missing)}"
        )
    if not part10:
        encoding = getattr(ds, "original_encoding", None)
        ts = _ENCODING_TS.get(tuple(encoding)) if encoding else None  # type: ignore[arg-type]
        if ts is None:
            raise NotDicomError(f"{path.name}: not a readable DICOM file: unknown encoding")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def _read(path: Path) -> Dataset:
    """Read one DICOM file, mapping read failures to :class:`SeriesError`."""
    return read_dataset(path)


def load_series(paths: Sequence[Path], *, slice_mode: bool = False) -> SourceSeries:
    """Read the instances of one CT/MR series and return a geometry-sorted volume.

    See :func:`_load` for the parameters, checks and errors; :func:`open_series` is the
    bounded-memory variant (the volume is read slab by slab).
    """
    return _load(paths, slice_mode=slice_mode, stream=False)


def open_series(paths: Sequence[Path], *, slice_mode: bool = False) -> SourceSeries:
    """Check and sort a series like :func:`load_series`, without keeping its pixels.

    Every instance is read and decoded once (the same checks as :func:`load_series`; the value
    statistics the engine needs are gathered), then only the headers are kept; the slices are
    read again slab by slab with :func:`read_slab`.  Enhanced (multi-frame) sources keep their
    volume (one instance holds every frame).

    Raises
    ------
    SeriesError
        As :func:`load_series`.
    """
    return _load(paths, slice_mode=slice_mode, stream=True)


def _frame_stats(f: _Frame, modality: str) -> _FrameStats:
    """Value statistics of a frame (modality units) before its pixels are dropped."""
    assert f.pixels is not None
    values = f.pixels.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
    keep = values if f.padding is None else values[~f.padding]
    mags = None
    if modality != "CT":
        mags = MagnitudeStats()
        mags.add(keep)
    return _FrameStats(
        float(keep.min()) if keep.size else math.inf,
        float(keep.max()) if keep.size else -math.inf,
        0 if f.padding is None else int(np.count_nonzero(f.padding)),
        mags,
    )


def _drop_pixels(ds: Dataset) -> None:
    """Remove the pixel data of a decoded source header (the builder never copies it)."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    if hasattr(ds, "_pixel_array"):
        ds._pixel_array = None  # pydicom's cache of the decoded array
        ds._pixel_id = {}


def read_slab(source: SourceSeries, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Slices ``start .. stop-1`` of a series: float32 values and padding mask.

    Padding voxels hold :attr:`SourceSeries.padding_fill`, as in :attr:`SourceSeries.volume`.

    Returns
    -------
    tuple
        ``(volume (k, y, x) in modality units, padding mask (k, y, x) or None)``.

    Raises
    ------
    SeriesError
        A file changed since the series was opened (unreadable, another matrix).
    """
    if source.volume is not None:
        mask = None if source.padding_mask is None else source.padding_mask[start:stop]
        return source.volume[start:stop], mask
    k = stop - start
    out = np.empty((k, source.rows, source.cols), dtype=np.float32)
    mask = np.zeros(out.shape, dtype=bool) if source.has_padding else None
    held: dict[int, Dataset] = {}
    for i in range(start, stop):
        path = source.files[i]
        ds = _read(path)
        frames = _classic_frames(ds, path)
        _drop_pixels(ds)
        held[i] = ds
        f = frames[0]
        assert f.pixels is not None
        if f.pixels.shape != out.shape[1:]:
            raise SeriesError(f"{path.name}: matrix changed to {f.pixels.shape} while enhancing")
        values = out[i - start]
        np.multiply(f.pixels, np.float32(f.slope), out=values, casting="unsafe")
        values += np.float32(f.intercept)
        if f.padding is not None:
            values[f.padding] = np.float32(source.padding_fill)
            if mask is not None:
                mask[i - start] = f.padding
    if isinstance(source.datasets, SourceHeaders):
        source.datasets.hold(held)
    return out, mask


def _load(paths: Sequence[Path], *, slice_mode: bool, stream: bool) -> SourceSeries:
    """Read the instances of one CT/MR series and return a geometry-sorted volume.

    Parameters
    ----------
    paths
        The files of the series: single-frame CT/MR Image Storage instances, or enhanced
        multi-frame instances (Enhanced CT/MR, Legacy Converted Enhanced CT/MR).
    slice_mode
        Load for slice mode, which enhances every image on its own: gantry tilt, gaps, missing
        slices, duplicate positions (multi-echo) and an absent Frame of Reference UID are
        accepted, and images whose orientation, matrix or pixel spacing differ from the main
        stack (a localizer mixed in) are left out and listed in :attr:`SourceSeries.notes`.
        The strict checks below apply otherwise (volume mode).

    Returns
    -------
    SourceSeries
        Slices sorted by position along the slice normal, in modality units.

    Raises
    ------
    SeriesError
        Empty input, unreadable files, mixed series or modalities, unsupported SOP classes,
        colour images, no pixel data, missing geometry, inconsistent orientation, matrix or pixel
        spacing, positions not along the slice normal, duplicate positions or non-uniform slice
        spacing.
    """
    if not paths:
        raise SeriesError("no instances given")
    frames: list[_Frame] = []
    series_uids: set[str] = set()
    modalities: set[str] = set()
    kinds: set[bool] = set()
    lossy = False
    for raw in paths:
        path = Path(raw)
        ds = _read(path)
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in ENHANCED_IMAGE_STORAGE:
            modality = ENHANCED_IMAGE_STORAGE[sop_class]  # type: ignore[index]
            enhanced = True
        elif sop_class in CLASSIC_IMAGE_STORAGE.values():
            modality = "CT" if sop_class == CLASSIC_IMAGE_STORAGE["CT"] else "MR"
            enhanced = False
        else:
            raise SeriesError(
                f"{path.name}: SOP Class {sop_class or '(none)'} is not a CT/MR image storage class"
            )
        _check_pixels_present(ds, path)
        _check_enhanceable_content(ds, path, modality, enhanced)
        series_uids.add(str(ds.get("SeriesInstanceUID", "")))
        modalities.add(modality)
        kinds.add(enhanced)
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        if str(ds.get("LossyImageCompression", "")) == "01" or ts in LOSSY_TRANSFER_SYNTAXES:
            lossy = True
        new = _enhanced_frames(ds, path) if enhanced else _classic_frames(ds, path)
        if stream and not enhanced:
            for f in new:
                f.stats = _frame_stats(f, modality)
                f.pixels, f.padding = None, None
        frames.extend(new)
        _drop_pixels(ds)
    if len(series_uids) != 1 or "" in series_uids:
        raise SeriesError(f"mixed series: {len(series_uids)} different Series Instance UIDs")
    if len(modalities) != 1 or len(kinds) != 1:
        raise SeriesError("mixed series: single-frame and multi-frame, or CT and MR instances")
    notes: list[str] = []
    if slice_mode:
        frames = _main_stack(frames, notes)
    source = _assemble(frames, modalities.pop(), kinds.pop(), lossy, slice_mode)
    if source.volume is not None:
        source.value_min = float(source.volume.min())
        source.value_max = float(source.volume.max())
    source.notes = notes
    return source


def _stack_key(f: _Frame) -> tuple[object, ...]:
    """Frames with the same key can be enhanced as one stack (orientation, matrix, spacing)."""
    return (
        tuple(np.round(f.orientation / ORIENTATION_TOLERANCE).astype(int).tolist()),
        f.shape,
        tuple(round(v, 4) for v in f.pixel_spacing),
    )


def _main_stack(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Keep the largest group of frames sharing orientation, matrix and pixel spacing."""
    groups: dict[tuple[object, ...], list[_Frame]] = {}
    for f in frames:
        groups.setdefault(_stack_key(f), []).append(f)
    if len(groups) == 1:
        return frames
    main = max(groups.values(), key=len)
    left = [f for f in frames if all(f is not m for m in main)]
    names = ", ".join(f.label for f in left[:10]) + (" ..." if len(left) > 10 else "")
    notes.append(
        f"{len(left)} image(s) not enhanced: orientation, matrix or pixel spacing differ from the "
        f"main stack of {len(main)} (e.g. a localizer): {names}"
    )
    return main


def _assemble(
    frames: list[_Frame], modality: str, enhanced: bool, lossy: bool, slice_mode: bool = False
) -> SourceSeries:
    """Check the frames' geometry, sort them along the normal and stack the volume.

    ``slice_mode``: only what slice mode needs (one orientation, matrix and pixel spacing);
    positions may be irregular, tilted or repeated and the Frame of Reference UID absent.
    """
    first = frames[0]
    shape = first.shape
    for f in frames[1:]:
        if f.shape != shape:
            raise SeriesError(f"inconsistent matrix: {shape} and {f.shape}")
        if np.max(np.abs(f.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"inconsistent orientation: {first.orientation.tolist()} and "
                f"{f.orientation.tolist()}"
            )
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise SeriesError(
                f"inconsistent pixel spacing: {first.pixel_spacing} and {f.pixel_spacing}"
            )
    row, col = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3:
        raise SeriesError("missing geometry: Image Orientation (Patient) is not unit vectors")
    if abs(float(row @ col)) > 1e-3:
        raise SeriesError(
            "missing geometry: Image Orientation (Patient) rows and columns not orthogonal"
        )
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    distances = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(distances, kind="stable")
    frames = [frames[i] for i in order]
    distances = distances[order]
    positions = np.stack([f.position for f in frames])
    thickness_values = {f.thickness for f in frames if f.thickness is not None}
    if len(frames) > 1 and slice_mode:
        gaps = np.diff(distances)
        positive = gaps[gaps >= POSITION_ATOL_MM]
        dz = (round(float(np.median(positive)), 6) if positive.size
              else float(first.thickness) if first.thickness else 1.0)
    elif len(frames) > 1:
        gaps = np.diff(distances)
        if np.any(gaps < POSITION_ATOL_MM):
            k = int(np.argmin(gaps))
            raise SeriesError(
                f"duplicate positions: two slices at {distances[k]:.3f} mm along the normal"
            )
        dz = round(float(np.median(gaps)), 6)
        if np.max(np.abs(gaps - dz)) > max(SPACING_RTOL * dz, POSITION_ATOL_MM):
            raise SeriesError(
                f"non-uniform slice spacing: gaps from {gaps.min():.4f} to {gaps.max():.4f} mm"
            )
        offsets = positions - positions[0]
        lateral = offsets - np.outer(offsets @ normal, normal)
        if np.max(np.linalg.norm(lateral, axis=1)) > max(SPACING_RTOL * dz, 0.01):
            raise SeriesError(
                "inconsistent geometry: slice positions are not along the slice normal"
                " (gantry tilt or sheared stack)"
            )
    else:
        dz = float(first.thickness) if first.thickness else 1.0
    thickness = float(first.thickness) if first.thickness else dz
    if thickness_values and max(thickness_values) - min(thickness_values) > POSITION_ATOL_MM:
        raise SeriesError(f"inconsistent slice thickness: {sorted(thickness_values)}")
    streamed = frames[0].pixels is None
    if streamed:
        volume = None
        padding_mask, (padding_fill, padding_value) = None, _streamed_padding(frames)
    else:
        volume = np.stack(
            [f.pixels.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
             for f in frames if f.pixels is not None]
        ).astype(np.float32)
        padding_mask, padding_fill, padding_value = _fill_padding(frames, volume)
    ds0 = first.ds
    study_uids = {str(f.ds.get("StudyInstanceUID", "")) for f in frames}
    for_uids = {str(f.ds.get("FrameOfReferenceUID", "")) for f in frames}
    if len(study_uids) != 1:
        raise SeriesError("mixed series: more than one Study Instance UID")
    if len(for_uids) != 1 or ("" in for_uids and not slice_mode):
        raise SeriesError("missing geometry: Frame of Reference UID absent or inconsistent")
    files = [f.path for f in frames if f.path is not None] if streamed else []
    return SourceSeries(
        datasets=SourceHeaders(frames[0].ds, files) if streamed else [f.ds for f in frames],
        volume=volume,
        spacing=(dz, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        slice_thickness=thickness,
        orientation=tuple(float(v) for v in first.orientation),  # type: ignore[arg-type]
        positions=positions,
        modality=modality,
        is_enhanced=enhanced,
        source_refs=[f.ref for f in frames],
        study_instance_uid=study_uids.pop(),
        series_instance_uid=str(ds0.SeriesInstanceUID),
        frame_of_reference_uid=for_uids.pop(),
        rescale_slopes=[f.slope for f in frames],
        rescale_intercepts=[f.intercept for f in frames],
        has_rescale=all(f.has_rescale for f in frames),
        window_centers=[f.centers for f in frames],
        window_widths=[f.widths for f in frames],
        photometric_interpretation=str(ds0.PhotometricInterpretation).upper(),
        bits_stored=int(ds0.get("BitsStored", 16) or 16),
        pixel_representation=int(ds0.get("PixelRepresentation", 0) or 0),
        lossy=lossy,
        slice_thickness_present=bool(thickness_values),
        instance_numbers=[f.number for f in frames],
        padding_value=padding_value,
        padding_mask=padding_mask,
        padding_fill=padding_fill,
        files=files,
        slice_locations=[f.ds.get("SliceLocation") for f in frames],
        has_padding=padding_value is not None,
        **(_streamed_stats(frames, modality, padding_fill) if streamed else {}),
    )


def _streamed_padding(frames: list[_Frame]) -> tuple[float, int | None]:
    """Fill value and Pixel Padding Value of a streamed series (as :func:`_fill_padding`)."""
    stats = [f.stats for f in frames if f.stats is not None]
    if not any(s.padding_voxels for s in stats):
        return 0.0, None
    values = {_int_or_none(f.ds.get("PixelPaddingValue")) for f in frames} - {None}
    if len(values) != 1:
        raise SeriesError(f"inconsistent Pixel Padding Value: {sorted(values)}")  # type: ignore[type-var]
    low = min(s.low for s in stats)
    return (low if math.isfinite(low) else 0.0), values.pop()


def _streamed_stats(frames: list[_Frame], modality: str, fill: float) -> dict[str, Any]:
    """``value_min``, ``value_max`` and ``magnitudes`` of a streamed series."""
    stats = [f.stats for f in frames if f.stats is not None]
    padded = sum(s.padding_voxels for s in stats)
    low = min([s.low for s in stats] + ([fill] if padded else []))
    high = max([s.high for s in stats] + ([fill] if padded else []))
    mags: MagnitudeStats | None = None
    if modality != "CT":
        mags = MagnitudeStats()
        for s in stats:
            assert s.magnitudes is not None
            mags.merge(s.magnitudes)
        if padded:
            mags.add_repeated(fill, padded)
    return {"value_min": low, "value_max": high, "magnitudes": mags}


def _fill_padding(
    frames: list[_Frame], volume: np.ndarray
) -> tuple[np.ndarray | None, float, int | None]:
    """Replace padding voxels of ``volume`` (in place) by the lowest non-padding value.

    Returns
    -------
    tuple
        The padding mask (``None`` without padding), the fill value and the Pixel Padding Value.
    """
    if all(f.padding is None for f in frames):
        return None, 0.0, None
    mask = np.stack(
        [f.padding if f.padding is not None else np.zeros(f.pixels.shape, bool) for f in frames]
    )
    values = {_int_or_none(f.ds.get("PixelPaddingValue")) for f in frames} - {None}
    if len(values) != 1:
        raise SeriesError(f"inconsistent Pixel Padding Value: {sorted(values)}")  # type: ignore[type-var]
    fill = float(volume[~mask].min()) if not mask.all() else 0.0
    volume[mask] = np.float32(fill)
    return mask, fill, values.pop()
