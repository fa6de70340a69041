r"""Build the new DERIVED series from a loaded source series and an enhanced volume (no I/O).

:func:`build_derived_series` returns one classic single-frame CT Image Storage (for CT) or MR Image
Storage (for MR) instance per output slice.  The datasets are valid by construction: every
requirement below is applied here, and anything that cannot be made compliant raises
``ValueError``.

- Identity: new Series Instance UID, new SOP Instance UIDs, Series Number = source + offset;
  Study Instance UID, Patient and Study modules and Frame of Reference UID are kept.
- Labelling: Image Type ``DERIVED\\SECONDARY\\<AXIAL|OTHER>\\SRNODE``, Derivation Description,
  Derivation Code Sequence (DCM 113085 Spatial resampling), Source Image Sequence listing every
  contributing source instance (DCM 121322, with Referenced Frame Number for multi-frame sources),
  Related Series Sequence (DCM 121323), Common Instance Reference (Referenced Series Sequence),
  Contributing Equipment (DCM 109101 for the scanner, DCM 109102 for srnode).
- Geometry: Rows/Columns and Pixel Spacing from the result; Image Position (Patient) keeps the
  field of view (the first pixel centre moves by half the spacing difference along the row and
  column directions); in volume mode slices are placed at ``slice_offsets`` along the normal.
- Pixels: rounded, stored with the source's Rescale Slope/Intercept where they fit 16 bits,
  otherwise with a switched Pixel Representation or, as a last resort, a recomputed rescale.

Enhanced (multi-frame) sources also produce classic single-frame instances: every viewer, PACS
and workstation displays CT/MR Image Storage, whereas multi-frame support is still patchy, and one
instance per slice lets a receiver start showing the series before it is complete.  The Source
Image Sequence points to the enhanced source instance with the frame number of each contributing
frame.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from dicom_node import codes as c
from dicom_node.config import DerivedConfig
from dicom_node.derive.series import SourceSeries
from sr_engine.api import EnhanceResult
from sr_engine.tasks import MODES

#: Lowest CT number kept (HU): nothing in a patient is less dense than air (-1000 HU); scanners
#: store -1024 as their floor.  Interpolation undershoot below this (and below the source minimum)
#: is clipped; values above are never clipped.
CT_FLOOR_HU = -1024.0
#: MR magnitude signal is never negative: undershoot below 0 (or the source minimum) is clipped.
MR_FLOOR = 0.0

_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Attributes removed from the copied source header: they describe the old pixel matrix, the old
#: instance or its signature, or are replaced by the derivation attributes.
_REMOVED_KEYWORDS = (
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ModalityLUTSequence",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "PixelAspectRatio",
    "PlanarConfiguration",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelDataProviderURL",
    "DataSetTrailingPadding",
    "NumberOfFrames",
    "FrameIncrementPointer",
    "InStackPositionNumber",
    "ImagesInAcquisition",
    "InstanceCreatorUID",
    "SourceImageSequence",
    "DerivationDescription",
    "DerivationCodeSequence",
    "RelatedSeriesSequence",
    "ReferencedSeriesSequence",
    "StudiesContainingOtherReferencedInstancesSequence",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "EncryptedAttributesSequence",
    "SliceLocation",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "ImageType",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
)

#: Top-level attribute groups of an enhanced instance that have no place in a classic image.
_ENHANCED_ONLY_ELEMENTS = range(0x9000, 0x10000)
_ENHANCED_ONLY_GROUPS = (0x0008, 0x0018, 0x0020, 0x0028, 0x0040)
_ENHANCED_ONLY_KEYWORDS = (
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "DimensionOrganizationType",
    "ContentQualification",
    "ImageType",
    "AcquisitionDateTime",
    "PresentationLUTShape",
    "RecognizableVisualFeatures",
    "AcquisitionContextSequence",
)

#: Functional groups whose first-level attributes a classic CT/MR header takes over.
_FUNCTIONAL_GROUPS = (
    "UnassignedSharedConvertedAttributesSequence",
    "UnassignedPerFrameConvertedAttributesSequence",
    "CTXRayDetailsSequence",
    "CTAcquisitionDetailsSequence",
    "CTReconstructionSequence",
    "CTExposureSequence",
    "MRTimingAndRelatedParametersSequence",
    "MRImagingModifierSequence",
    "MRReceiveCoilSequence",
    "MRTransmitCoilSequence",
    "MRFOVGeometrySequence",
)


class DerivationError(ValueError):
    """The result cannot be turned into a compliant derived series."""


@dataclass(frozen=True)
class DerivationOptions:
    """How derived series are identified, labelled and encoded.

    Attributes
    ----------
    uid_root
        UID root for new UIDs; empty: the UUID-derived ``2.25.<integer>`` form.
    series_number_offset
        Added to the source Series Number.
    series_description_prefix
        Template put before the source Series Description; ``{scale}`` and ``{mode}`` are filled.
    manufacturer
        Manufacturer of the srnode processing equipment item.
    software_version
        srnode version (Software Versions of the processing equipment item).
    description_suffix
        Appended to the Series Description (e.g. ``" (CHECK)"`` from the safety gate); it always
        survives truncation to 64 characters.
    transfer_syntax
        Output transfer syntax UID: explicit (default) or implicit VR little endian, deflated, RLE
        Lossless or JPEG 2000 Lossless.
    now
        Time of the derivation (Contribution DateTime, instance creation); ``None``: the clock.
    institution_name
        Institution Name of the processing equipment item (empty: left out).
    mode, scale
        The processing done; ``None``: inferred from the result's geometry.
    """

    uid_root: str = ""
    series_number_offset: int = 1000
    series_description_prefix: str = "SR x{scale} "
    manufacturer: str = "srnode project"
    software_version: str = "0.1.0"
    description_suffix: str = ""
    transfer_syntax: str = ExplicitVRLittleEndian
    now: datetime | None = None
    institution_name: str = ""
    mode: str | None = None
    scale: int | None = None

    @classmethod
    def from_config(
        cls,
        derived: DerivedConfig,
        software_version: str,
        *,
        transfer_syntax: str = ExplicitVRLittleEndian,
        description_suffix: str = "",
        now: datetime | None = None,
        mode: str | None = None,
        scale: int | None = None,
    ) -> DerivationOptions:
        """Build options from the ``[derived]`` configuration section.

        Parameters
        ----------
        derived
            The ``[derived]`` section (UID root, series number offset, description prefix,
            manufacturer, institution name).
        software_version
            srnode version.
        transfer_syntax, description_suffix, now, mode, scale
            As the attributes of the same names.
        """
        return cls(
            uid_root=derived.uid_root,
            series_number_offset=derived.series_number_offset,
            series_description_prefix=derived.series_description_prefix,
            manufacturer=derived.manufacturer,
            software_version=software_version,
            description_suffix=description_suffix,
            transfer_syntax=transfer_syntax,
            now=now,
            institution_name=derived.institution_name,
            mode=mode,
            scale=scale,
        )


@dataclass(frozen=True)
class _PixelEncoding:
    """How modality values were mapped to stored values."""

    stored: np.ndarray
    slopes: list[float]
    intercepts: list[float]
    pixel_representation: int
    bits_stored: int
    recomputed: bool
    clipped_voxels: int


def _ds(value: float) -> str:
    """Format a float as a DS string (at most 16 characters, no ``-0``)."""
    v = round(float(value), 6) + 0.0
    if not math.isfinite(v):
        raise DerivationError(f"non-finite decimal value {value!r}")
    return format_number_as_ds(v)


def _new_uid(root: str) -> UID:
    """Return a new UID under ``root`` (``2.25`` UUID form when empty)."""
    if not root:
        return generate_uid(prefix=None)
    return generate_uid(prefix=root.rstrip(".") + ".")


def _check_uid_root(root: str) -> None:
    """Refuse UID roots that cannot prefix valid UIDs."""
    if root and (not _UID_ROOT_RE.match(root.rstrip(".")) or len(root) > 40):
        raise DerivationError(f"uid_root {root!r} is not a valid UID root of at most 40 characters")


def _code_item(code: Code) -> Dataset:
    """Return a Code Sequence item for ``code``."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        item.CodingSchemeVersion = code.scheme_version
    item.CodeMeaning = code.meaning
    return item


def _infer_mode_scale(
    source: SourceSeries, result: EnhanceResult, options: DerivationOptions
) -> tuple[str, int]:
    """Return the processing mode and scale, from the options or the result's geometry."""
    nz = result.volume.shape[0]
    src_off = np.asarray(source.slice_offsets)
    mode = options.mode
    if mode is None:
        same = (
            nz == source.num_slices
            and len(result.slice_offsets) == nz
            and np.allclose(result.slice_offsets, src_off, atol=1e-3)
        )
        mode = "slice" if same else "volume"
    if mode not in MODES:
        raise DerivationError(f"unknown mode {mode!r}")
    scale = options.scale
    if scale is None:
        ratio = (
            source.spacing[2] / result.spacing[2]
            if mode == "slice"
            else source.spacing[0] / result.spacing[0]
        )
        scale = max(1, round(ratio))
    return mode, int(scale)


def _check_result(source: SourceSeries, result: EnhanceResult, mode: str) -> None:
    """Refuse results whose shape, spacing, offsets or contributions do not add up."""
    vol = result.volume
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise DerivationError(f"result volume must be (z, y, x), got shape {vol.shape}")
    nz = vol.shape[0]
    if not np.all(np.isfinite(vol)):
        raise DerivationError("result volume contains NaN or infinite values")
    if len(result.slice_offsets) != nz or len(result.contributing_slices) != nz:
        raise DerivationError(
            f"result has {nz} slices but {len(result.slice_offsets)} offsets and "
            f"{len(result.contributing_slices)} contribution lists"
        )
    if any(s <= 0 or not math.isfinite(s) for s in result.spacing) or result.slice_thickness <= 0:
        raise DerivationError(f"invalid result spacing {result.spacing} / thickness")
    for k, contrib in enumerate(result.contributing_slices):
        if not contrib or any(not 0 <= i < source.num_slices for i in contrib):
            raise DerivationError(f"output slice {k}: invalid contributing slices {contrib}")
    if mode == "slice" and nz != source.num_slices:
        raise DerivationError(
            f"slice mode needs one output slice per source slice ({source.num_slices}), got {nz}"
        )


def _encode_pixels(
    source: SourceSeries, result: EnhanceResult, nearest: Sequence[int]
) -> _PixelEncoding:
    """Round, clip to physical limits and map modality values to 16-bit stored values.

    Modality values are clipped only from below, to the physically meaningful floor
    (:data:`CT_FLOOR_HU` for CT, :data:`MR_FLOOR` for MR, or the source minimum when that is
    lower): interpolation and networks undershoot at sharp edges.  Nothing is clipped from above.
    The source's Rescale Slope/Intercept (of the nearest source slice) is kept when the stored
    values fit 16 bits with the source's Pixel Representation or the other one; otherwise one
    common slope/intercept is recomputed (unsigned) so that the full range is represented.
    """
    # float32 throughout (exact for integers up to 2**24): a 300-slice 1024x1024 output is
    # 1.2 GB per copy, so the arithmetic works in place on as few copies as possible.
    vol = np.asarray(result.volume, dtype=np.float32)
    floor = CT_FLOOR_HU if source.modality == "CT" else MR_FLOOR
    floor = min(floor, float(source.volume.min()))
    clipped = int(np.count_nonzero(vol < floor))
    vol = np.maximum(vol, np.float32(floor))
    slopes = [source.rescale_slopes[j] for j in nearest]
    intercepts = [source.rescale_intercepts[j] for j in nearest]
    if any(s == 0 for s in slopes):
        raise DerivationError("source Rescale Slope is 0")
    m = np.asarray(slopes, dtype=np.float32)[:, None, None]
    b = np.asarray(intercepts, dtype=np.float32)[:, None, None]
    if np.all(m == 1):
        stored = np.rint(vol)
        stored -= b
    else:
        stored = vol - b
        stored /= m
    np.rint(stored, out=stored)
    lo, hi = float(stored.min()), float(stored.max())
    ranges = {0: (0, 65535), 1: (-32768, 32767)}
    for pr in (source.pixel_representation, 1 - source.pixel_representation):
        rmin, rmax = ranges[pr]
        if rmin <= lo and hi <= rmax:
            bits = source.bits_stored if pr == source.pixel_representation else 16
            if pr == 0 and hi > 2**bits - 1:
                bits = 16
            if pr == 1 and (lo < -(2 ** (bits - 1)) or hi > 2 ** (bits - 1) - 1):
                bits = 16
            dtype = np.uint16 if pr == 0 else np.int16
            return _PixelEncoding(
                stored.astype(dtype), slopes, intercepts, pr, bits, False, clipped
            )
    if not source.has_rescale and source.modality != "CT":
        raise DerivationError(
            f"enhanced values {vol.min():.1f}..{vol.max():.1f} do not fit 16 bits and the source"
            " has no Rescale Slope/Intercept to recompute"
        )
    vmin, vmax = float(vol.min()), float(vol.max())
    slope = max(min(slopes), (vmax - vmin) / 65535.0)
    slope = float(format_number_as_ds(slope * (1 + 1e-6)))
    intercept = float(_ds(math.floor(vmin)))
    new = np.clip(np.rint((vol - intercept) / slope), 0, 65535).astype(np.uint16)
    n = vol.shape[0]
    return _PixelEncoding(new, [slope] * n, [intercept] * n, 0, 16, True, clipped)


def _utc_offset(ds: Dataset) -> timezone | None:
    """Return the source's Timezone Offset From UTC as a timezone, if present and valid."""
    value = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", value)
    if not m:
        return None
    delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return timezone(-delta if m.group(1) == "-" else delta)


def _copy_header(ds: Dataset) -> Dataset:
    """Copy a header without its pixel data or private attributes."""
    out = Dataset()
    for elem in ds:
        if elem.tag.is_private or elem.tag == Tag("PixelData"):
            continue
        out.add(copy.deepcopy(elem))
    return out


def _strip(ds: Dataset) -> None:
    """Remove overlays, curves, private data and everything tied to the old pixel matrix."""
    ds.remove_private_tags()
    for tag in list(ds.keys()):
        group = tag >> 16
        if 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF:
            del ds[tag]
    for keyword in _REMOVED_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def _merge_missing(target: Dataset, items: Iterable[Dataset]) -> None:
    """Copy first-level attributes of ``items`` into ``target`` where ``target`` lacks them."""
    for item in items:
        for elem in item:
            if elem.tag.is_private or elem.tag in target:
                continue
            target.add(copy.deepcopy(elem))


def _functional_items(ds: Dataset, frame_index: int, keyword: str) -> list[Dataset]:
    """Return the items of one functional group for a frame (per-frame first, then shared)."""
    items: list[Dataset] = []
    for fg_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(fg_keyword)
        if groups is not None and len(groups) > index and keyword in groups[index]:
            items.extend(groups[index][keyword])
    return items


def _classic_from_enhanced(ds: Dataset, frame_index: int, modality: str) -> Dataset:
    """Build a classic CT/MR image header for one frame of an enhanced instance."""
    out = Dataset()
    for elem in ds:
        tag = elem.tag
        if tag.is_private or tag == Tag("PixelData"):
            continue
        if tag.group in _ENHANCED_ONLY_GROUPS and tag.element in _ENHANCED_ONLY_ELEMENTS:
            continue
        if elem.keyword in _ENHANCED_ONLY_KEYWORDS:
            continue
        out.add(copy.deepcopy(elem))
    for keyword in _FUNCTIONAL_GROUPS:
        _merge_missing(out, _functional_items(ds, frame_index, keyword))
    content = _functional_items(ds, frame_index, "FrameContentSequence")
    acq_dt = str(content[0].get("FrameAcquisitionDateTime", "")) if content else ""
    acq_dt = acq_dt or str(ds.get("AcquisitionDateTime", "") or "")
    if acq_dt and "AcquisitionDate" not in out:
        out.AcquisitionDate = acq_dt[:8]
        if len(acq_dt) > 8:
            out.AcquisitionTime = re.split(r"[+-]", acq_dt[8:])[0]
    if "AcquisitionNumber" not in out:
        number = content[0].get("FrameAcquisitionNumber") if content else None
        out.AcquisitionNumber = number if number is not None else None
    echoes = _functional_items(ds, frame_index, "MREchoSequence")
    if echoes and "EchoTime" not in out:
        out.EchoTime = echoes[0].get("EffectiveEchoTime")
    flips = _functional_items(ds, frame_index, "MRTimingAndRelatedParametersSequence")
    if flips and "FlipAngle" not in out and flips[0].get("FlipAngle") is not None:
        out.FlipAngle = flips[0].FlipAngle
    _map_enhanced_contrast(out)
    anatomy = _functional_items(ds, frame_index, "FrameAnatomySequence")
    laterality = str(anatomy[0].get("FrameLaterality", "") or "") if anatomy else ""
    if laterality in ("R", "L", "U", "B") and "ImageLaterality" not in out:
        out.ImageLaterality = laterality
    if modality == "CT" and "KVP" not in out:
        out.KVP = None
    if modality == "MR":
        _fill_mr_sequence_attributes(ds, out)
    return out


def _code_meaning(items: Sequence[Dataset]) -> str:
    """Return the Code Meaning of the first code item, or an empty string."""
    return str(items[0].get("CodeMeaning", "") or "") if items else ""


def _map_enhanced_contrast(out: Dataset) -> None:
    """Replace the Enhanced Contrast/Bolus module's sequences by classic Contrast/Bolus values."""
    agents = out.get("ContrastBolusAgentSequence")
    if agents:
        if not out.get("ContrastBolusAgent"):
            out.ContrastBolusAgent = _code_meaning(agents)[: c.LO_MAX_CHARS] or None
        routes = agents[0].get("ContrastBolusAdministrationRouteSequence")
        if routes and not out.get("ContrastBolusRoute"):
            out.ContrastBolusRoute = _code_meaning(routes)[: c.LO_MAX_CHARS]
        volume = agents[0].get("ContrastBolusVolume")
        if volume not in (None, "") and "ContrastBolusVolume" not in out:
            out.ContrastBolusVolume = volume
    for keyword in ("ContrastBolusAgentSequence", "ContrastBolusAdministrationRouteSequence"):
        if keyword in out:
            delattr(out, keyword)


def _fill_mr_sequence_attributes(enhanced: Dataset, out: Dataset) -> None:
    r"""Fill the classic MR Image module's Type 1/2 sequence attributes from enhanced ones.

    Scanning Sequence follows Echo Pulse Sequence (SPIN: SE, GRADIENT: GR, BOTH: SE\\GR);
    Sequence Variant lists what the enhanced attributes say (SP spoiled, MTC magnetisation
    transfer, SS steady state, MP magnetisation prepared) or NONE.
    """
    if not out.get("ScanningSequence"):
        echo = str(enhanced.get("EchoPulseSequence", "") or "")
        out.ScanningSequence = {"SPIN": "SE", "GRADIENT": "GR", "BOTH": ["SE", "GR"]}.get(
            echo, "RM"
        )
    if not out.get("SequenceVariant"):
        variants: list[str] = []
        if str(enhanced.get("Spoiling", "NONE")) not in ("NONE", ""):
            variants.append("SP")
        if str(enhanced.get("MagnetizationTransfer", "NONE")) not in ("NONE", ""):
            variants.append("MTC")
        if str(enhanced.get("SteadyStatePulseSequence", "NONE")) not in ("NONE", ""):
            variants.append("SS")
        if str(enhanced.get("SaturationRecovery", "NO")) == "YES" or str(
            enhanced.get("T2Preparation", "NO")
        ) == "YES":
            variants.append("MP")
        out.SequenceVariant = variants or "NONE"
    for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        if keyword not in out:
            value = enhanced.get(keyword) if keyword == "MRAcquisitionType" else None
            setattr(out, keyword, value)
    if "RepetitionTime" not in out:
        out.RepetitionTime = None


def _series_description(
    source_ds: Dataset, options: DerivationOptions, mode: str, scale: int
) -> str:
    """Return prefix + original description + suffix, within the 64 characters of an LO."""
    try:
        prefix = options.series_description_prefix.format(scale=scale, mode=mode)
    except (KeyError, IndexError, ValueError) as exc:
        raise DerivationError(
            f"series_description_prefix {options.series_description_prefix!r}: {exc}"
        ) from exc
    original = str(source_ds.get("SeriesDescription", "") or "")
    suffix = options.description_suffix
    if len(suffix) >= c.LO_MAX_CHARS:
        raise DerivationError("description_suffix is longer than a Series Description allows")
    text = (prefix + original).rstrip()[: c.LO_MAX_CHARS - len(suffix)].rstrip() + suffix
    return text.replace("\\", "/").strip()


def _derivation_description(
    result: EnhanceResult, mode: str, scale: int, enc: _PixelEncoding, units: str,
    options: DerivationOptions,
) -> str:
    """Return the Derivation Description text (at most 1024 characters)."""
    cons = result.consistency
    dz, dy, dx = result.spacing
    text = (
        f"Super-resolution by srnode {options.software_version}: model {result.model_name} "
        f"(weights {result.model_version}) on {result.device}, {mode} mode x{scale}; output "
        f"spacing {dz:.4g}/{dy:.4g}/{dx:.4g} mm (slice/row/column), thickness "
        f"{result.slice_thickness:.4g} mm. Re-degradation check against the source: mean abs "
        f"error {cons.mean_abs_error:.2f} {units}, max abs error {cons.max_abs_error:.2f} "
        f"{units}, PSNR {cons.psnr:.1f} dB."
    )
    if enc.clipped_voxels:
        text += f" {enc.clipped_voxels} voxels below the physical floor were clipped."
    if enc.recomputed:
        text += " Rescale slope/intercept recomputed to represent the enhanced range."
    return text[: c.ST_MAX_CHARS]


def _acquisition_item(ds: Dataset) -> Dataset:
    """Contributing Equipment item (DCM 109101) from the source header, inventing nothing else."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(c.ACQUISITION_EQUIPMENT)])
    item.Manufacturer = str(ds.get("Manufacturer", "") or "") or "UNKNOWN"
    for keyword in (
        "InstitutionName",
        "InstitutionAddress",
        "StationName",
        "InstitutionalDepartmentName",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "SpatialResolution",
        "DateOfLastCalibration",
        "TimeOfLastCalibration",
    ):
        value = ds.get(keyword)
        if value not in (None, "", []):
            item.add(DataElement(Tag(keyword), ds[keyword].VR, copy.deepcopy(value)))
    return item


def _processing_item(
    options: DerivationOptions, now: datetime, result: EnhanceResult, mode: str, scale: int
) -> Dataset:
    """Contributing Equipment item (DCM 109102) describing srnode."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(c.PROCESSING_EQUIPMENT)])
    item.Manufacturer = options.manufacturer or "srnode project"
    if options.institution_name:
        item.InstitutionName = options.institution_name[: c.LO_MAX_CHARS]
    item.ManufacturerModelName = c.PROCESSING_MODEL_NAME
    item.SoftwareVersions = options.software_version
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f") + (
        now.strftime("%z") if now.tzinfo is not None else ""
    )
    item.ContributionDescription = (
        f"Super-resolution ({mode} mode x{scale}) with model {result.model_name} "
        f"{result.model_version}; new derived series"
    )[: c.ST_MAX_CHARS]
    return item


def build_derived_series(
    source: SourceSeries, result: EnhanceResult, options: DerivationOptions
) -> list[Dataset]:
    """Build the derived series: one classic CT/MR image instance per output slice.

    Parameters
    ----------
    source
        The loaded source series.
    result
        The enhanced volume with its geometry and provenance.
    options
        Identity, labelling and encoding options.

    Returns
    -------
    list of pydicom.dataset.Dataset
        The instances in slice order (Instance Number 1..n), each with File Meta Information.

    Raises
    ------
    DerivationError
        (a ``ValueError``) when the result does not fit the source, an option is invalid or the
        values cannot be represented.
    """
    if source.modality not in c.CLASSIC_IMAGE_STORAGE:
        raise DerivationError(f"modality {source.modality!r} is not CT or MR")
    ts = UID(options.transfer_syntax)
    if ts not in c.OUTPUT_TRANSFER_SYNTAXES:
        raise DerivationError(f"unsupported output transfer syntax {ts}")
    _check_uid_root(options.uid_root)
    mode, scale = _infer_mode_scale(source, result, options)
    _check_result(source, result, mode)
    nz, rows, cols = result.volume.shape
    if rows > 65535 or cols > 65535:
        raise DerivationError(f"matrix {rows}x{cols} exceeds the US range of Rows/Columns")

    src_off = np.asarray(source.slice_offsets)
    nearest = [int(np.argmin(np.abs(src_off - off))) for off in result.slice_offsets]
    enc = _encode_pixels(source, result, nearest)

    row_dir = np.asarray(source.orientation[:3])
    col_dir = np.asarray(source.orientation[3:])
    normal = source.normal
    dz, dy, dx = (float(v) for v in result.spacing)
    shift = row_dir * 0.5 * (dx - source.spacing[2]) + col_dir * 0.5 * (dy - source.spacing[1])
    if mode == "slice":
        positions = source.positions + shift
    else:
        positions = np.stack(
            [source.positions[0] + off * normal + shift for off in result.slice_offsets]
        )

    ds0 = source.datasets[0]
    series_number = int(ds0.get("SeriesNumber") or 0) + options.series_number_offset
    if not -(2**31) <= series_number <= c.IS_MAX:
        raise DerivationError(f"series number {series_number} is outside the IS range")
    series_uid = _new_uid(options.uid_root)
    description = _series_description(ds0, options, mode, scale)
    now = options.now or datetime.now(UTC)
    tz = _utc_offset(ds0)
    local_now = now.astimezone(tz) if (tz is not None and now.tzinfo is not None) else now
    units = "HU" if source.modality == "CT" else "signal units"
    derivation = _derivation_description(result, mode, scale, enc, units, options)
    processing_item = _processing_item(options, now, result, mode, scale)

    # Slice Location: recomputed when the source's follows the position along the normal.
    slice_locs: list[float] | None = None
    src_locs = [ds.get("SliceLocation") for ds in source.datasets]
    if not source.is_enhanced and all(v not in (None, "") for v in src_locs):
        locs = np.asarray([float(v) for v in src_locs])  # type: ignore[arg-type]
        if np.allclose(locs - locs[0], src_off, atol=0.01):
            slice_locs = [float(locs[0] + off) for off in result.slice_offsets]

    headers: dict[int, Dataset] = {}
    out: list[Dataset] = []
    for k in range(nz):
        j = nearest[k]
        if j not in headers:
            src_ds = source.datasets[j]
            ref = source.source_refs[j]
            if source.is_enhanced:
                frame = (ref.frame_number or 1) - 1
                base = _classic_from_enhanced(src_ds, frame, source.modality)
            else:
                base = _copy_header(src_ds)
            _strip(base)
            headers[j] = base
        ds = copy.deepcopy(headers[j])
        acquisition = _acquisition_item(source.datasets[j])
        _set_identity(ds, source, series_uid, series_number, description, k, options, local_now)
        _set_derivation(
            ds, source, result.contributing_slices[k], derivation, acquisition, processing_item
        )
        _set_geometry(
            ds, source, positions[k], (dy, dx), result, nz,
            None if slice_locs is None else slice_locs[k],
        )
        _set_pixels(ds, source, enc, k, j, rows, cols)
        _set_file_meta(ds, ts, options)
        out.append(ds)
    return out


def _set_identity(
    ds: Dataset, source: SourceSeries, series_uid: UID, series_number: int, description: str,
    k: int, options: DerivationOptions, now: datetime,
) -> None:
    """New UIDs, numbers, description, image type and creation dates of instance ``k``."""
    modality = source.modality
    ds.SOPClassUID = c.CLASSIC_IMAGE_STORAGE[modality]
    ds.SOPInstanceUID = _new_uid(options.uid_root)
    ds.StudyInstanceUID = source.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = source.frame_of_reference_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = k + 1
    if description:
        ds.SeriesDescription = description
    elif "SeriesDescription" in ds:
        del ds.SeriesDescription
    src_type = [str(v).upper() for v in (source.datasets[0].get("ImageType") or [])]
    if modality == "CT":
        value3 = (
            c.CT_IMAGE_TYPE_LOCALIZER
            if len(src_type) > 2 and src_type[2] == c.CT_IMAGE_TYPE_LOCALIZER
            else c.CT_IMAGE_TYPE_VALUE3
        )
    else:
        value3 = c.MR_IMAGE_TYPE_VALUE3
    ds.ImageType = [*c.IMAGE_TYPE_DERIVED, value3, c.IMAGE_TYPE_TOKEN]
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in ds:  # Type 2 in the Patient module
            setattr(ds, keyword, None if keyword != "PatientName" else "")
    for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber", "PositionReferenceIndicator", "Manufacturer"):
        if keyword not in ds:  # Type 2 in General Study / Frame of Reference / Equipment
            setattr(ds, keyword, None)


def _set_derivation(
    ds: Dataset, source: SourceSeries, contributing: Sequence[int], derivation: str,
    acquisition: Dataset, processing: Dataset,
) -> None:
    """Derivation description and code, source references and contributing equipment."""
    ds.DerivationDescription = derivation
    ds.DerivationCodeSequence = DicomSequence([_code_item(c.SPATIAL_RESAMPLING)])
    items: list[Dataset] = []
    seen: set[tuple[str, int | None]] = set()
    instances: dict[str, str] = {}
    for i in sorted(set(contributing)):
        ref = source.source_refs[i]
        key = (ref.sop_instance_uid, ref.frame_number)
        if key in seen:
            continue
        seen.add(key)
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        if ref.frame_number is not None:
            item.ReferencedFrameNumber = ref.frame_number
        item.PurposeOfReferenceCodeSequence = DicomSequence(
            [_code_item(c.SOURCE_IMAGE_FOR_PROCESSING)]
        )
        items.append(item)
        instances[ref.sop_instance_uid] = ref.sop_class_uid
    ds.SourceImageSequence = DicomSequence(items)
    related = Dataset()
    related.StudyInstanceUID = source.study_instance_uid
    related.SeriesInstanceUID = source.series_instance_uid
    related.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code_item(c.SOURCE_SERIES_FOR_PROCESSING)]
    )
    ds.RelatedSeriesSequence = DicomSequence([related])
    referenced = Dataset()
    referenced.SeriesInstanceUID = source.series_instance_uid
    refs = []
    for uid, cls in instances.items():
        inst = Dataset()
        inst.ReferencedSOPClassUID = cls
        inst.ReferencedSOPInstanceUID = uid
        refs.append(inst)
    referenced.ReferencedInstanceSequence = DicomSequence(refs)
    ds.ReferencedSeriesSequence = DicomSequence([referenced])
    previous = [
        item
        for item in ds.get("ContributingEquipmentSequence", [])
        if not any(
            code.get("CodeValue") in (c.ACQUISITION_EQUIPMENT.value, c.PROCESSING_EQUIPMENT.value)
            for code in item.get("PurposeOfReferenceCodeSequence", [])
        )
    ]
    ds.ContributingEquipmentSequence = DicomSequence(
        [*previous, acquisition, copy.deepcopy(processing)]
    )
    if source.lossy:
        ds.LossyImageCompression = "01"


def _set_geometry(
    ds: Dataset, source: SourceSeries, position: np.ndarray, pixel_spacing: tuple[float, float],
    result: EnhanceResult, nz: int, slice_location: float | None,
) -> None:
    """Image Plane module of one output slice."""
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in source.orientation]
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.SliceThickness = _ds(result.slice_thickness)
    if nz > 1:
        ds.SpacingBetweenSlices = _ds(result.spacing[0])
    if slice_location is not None:
        ds.SliceLocation = _ds(slice_location)


def _set_pixels(
    ds: Dataset, source: SourceSeries, enc: _PixelEncoding, k: int, j: int, rows: int, cols: int
) -> None:
    """Image Pixel module, rescale and windowing of output slice ``k`` (nearest source ``j``)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = source.photometric_interpretation
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = enc.pixel_representation
    identity = enc.slopes[k] == 1 and enc.intercepts[k] == 0
    if source.modality == "CT" or enc.recomputed or (source.has_rescale and not identity):
        ds.RescaleIntercept = _ds(enc.intercepts[k])
        ds.RescaleSlope = _ds(enc.slopes[k])
        if source.modality == "CT" and not ds.get("RescaleType"):
            ds.RescaleType = "HU"
    centers, widths = source.window_centers[j], source.window_widths[j]
    if centers and widths and len(centers) == len(widths) and all(w >= 1 for w in widths):
        ds.WindowCenter = [_ds(v) for v in centers] if len(centers) > 1 else _ds(centers[0])
        ds.WindowWidth = [_ds(v) for v in widths] if len(widths) > 1 else _ds(widths[0])
    else:
        for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
            if keyword in ds:
                delattr(ds, keyword)
    pixels = np.ascontiguousarray(enc.stored[k]).astype("<" + enc.stored.dtype.str[1:])
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"


def _set_file_meta(ds: Dataset, ts: UID, options: DerivationOptions) -> None:
    """File Meta Information, then encode the pixel data for compressed transfer syntaxes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = c.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = (c.IMPLEMENTATION_VERSION_PREFIX + options.software_version)[
        :16
    ]
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = ts
