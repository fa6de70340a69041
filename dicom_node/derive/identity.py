"""Identity and provenance of a derived instance: UIDs, numbers, labels, references, equipment."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicom_node import codes as c
from dicom_node.derive.elements import DerivationError, code_item, new_uid
from dicom_node.derive.options import DerivationOptions
from dicom_node.derive.series import SourceSeries
from sr_engine.api import ConsistencyReport, EnhanceResult

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


def utc_offset(ds: Dataset) -> timezone | None:
    """Return the source's Timezone Offset From UTC as a timezone, if present and valid."""
    value = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", value)
    if not m:
        return None
    delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return timezone(-delta if m.group(1) == "-" else delta)


_REMOVED_TAGS = frozenset(Tag(k) for k in _REMOVED_KEYWORDS)


def _kept(tag: BaseTag) -> bool:
    """Whether a top-level source attribute may be copied into a derived instance."""
    group = tag >> 16
    return not (tag.is_private or tag in _REMOVED_TAGS or 0x6000 <= group <= 0x60FF
                or 0x5000 <= group <= 0x50FF)


def _element_vr(elem: DataElement | RawDataElement) -> str:
    """VR of an element, from the data dictionary when the file was implicit VR."""
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return ""


#: Attributes every derived instance gets new values for (:func:`set_identity`,
#: :func:`dicom_node.derive.pixels.set_pixel_module`): the builder does not copy them at all.
REPLACED_TAGS = frozenset(Tag(k) for k in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "SeriesNumber", "InstanceNumber", "InstanceCreationDate", "InstanceCreationTime",
    "ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation",
))


def copy_header(ds: Dataset, skip: frozenset[BaseTag] = frozenset()) -> Dataset:
    """Copy a header without pixel data, private attributes, overlays and curves.

    Also left out: everything tied to the old pixel matrix or instance
    (:data:`_REMOVED_KEYWORDS`), and the attributes in ``skip``.  Elements pydicom has not
    parsed yet are immutable and shared with the source (reading or setting one in the copy
    parses it into a new element of the copy); parsed elements are deep copies.  Private
    attributes nested in sequences are removed.
    """
    items: dict[BaseTag, DataElement | RawDataElement] = {}
    nested = []
    for tag, elem in ds.items():
        if tag in skip or not _kept(tag):
            continue
        items[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
        if _element_vr(elem) == "SQ":
            nested.append(tag)
    out = Dataset(items)
    for tag in nested:
        for item in out[tag].value or []:
            item.remove_private_tags()
    return out


def strip_source_header(ds: Dataset) -> None:
    """Remove overlays, curves, private data and everything tied to the old pixel matrix."""
    for tag in [t for t in ds.keys() if not _kept(t)]:
        del ds[tag]
    for tag in [t for t, e in ds.items() if _element_vr(e) == "SQ"]:
        for item in ds[tag].value or []:
            item.remove_private_tags()


def series_description(
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


#: Characters of the Derivation Description kept for the series-level figures (the
#: re-degradation check, clipped voxels) that a streamed series only knows after its last slab.
DERIVATION_TAIL_CHARS = 320


def derivation_head(
    result: EnhanceResult, mode: str, scale: int, options: DerivationOptions,
) -> str:
    """The Derivation Description up to the series-level figures (model, geometry, engine)."""
    dz, dy, dx = result.spacing
    # an interpolation (fallback, a safer kernel, or one a rule named) is not called SR
    what = ("Interpolation (not super-resolution)" if result.interpolated
            else "Super-resolution")
    text = (
        f"{what} by srnode {options.software_version}: model {result.model_name} "
        f"(weights {result.model_version}) on {result.device}, {mode} mode x{scale}; output "
        f"spacing {dz:.4g}/{dy:.4g}/{dx:.4g} mm (slice/row/column), thickness "
        f"{result.slice_thickness:.4g} mm. Engine: {result.describe()}."
    )
    return text[: c.ST_MAX_CHARS - DERIVATION_TAIL_CHARS - 1]


def derivation_tail(
    consistency: ConsistencyReport, units: str, clipped_voxels: int, recomputed: bool
) -> str:
    """The series-level figures of the Derivation Description."""
    cons = consistency
    text = (
        f"Re-degradation check against the source: mean abs error {cons.mean_abs_error:.2f} "
        f"{units}, max abs error {cons.max_abs_error:.2f} {units}, PSNR {cons.psnr:.1f} dB."
    )
    if clipped_voxels:
        text += f" {clipped_voxels} voxels below the physical floor were clipped."
    if recomputed:
        text += " Rescale slope/intercept recomputed to represent the enhanced range."
    return text[:DERIVATION_TAIL_CHARS]


def acquisition_item(ds: Dataset) -> Dataset | None:
    """Contributing Equipment item (DCM 109101) from the source header, inventing nothing.

    ``None`` when the source names no Manufacturer (Type 1 in the item): an item saying
    "unknown" would be an invented value.
    """
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    if not manufacturer:
        return None
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([code_item(c.ACQUISITION_EQUIPMENT)])
    item.Manufacturer = manufacturer
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


def processing_item(
    options: DerivationOptions, now: datetime, result: EnhanceResult, mode: str, scale: int
) -> Dataset:
    """Contributing Equipment item (DCM 109102) describing srnode."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([code_item(c.PROCESSING_EQUIPMENT)])
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


def equipment_history(
    previous: Sequence[Dataset] | None, acquisition: Dataset | None, processing: Dataset
) -> list[Dataset]:
    """Contributing Equipment items of a derived instance: the source's history, then srnode.

    Every item the source already lists is kept as it is (the scanner, workstations that
    processed it before).  The acquisition item built from the source header is added only when
    the history names no acquisition equipment (DCM 109101) yet; srnode's processing item
    (DCM 109102) always comes last.
    """
    items = [copy.deepcopy(item) for item in previous or []]
    has_acquisition = any(
        code.get("CodeValue") == c.ACQUISITION_EQUIPMENT.value
        and code.get("CodingSchemeDesignator") == c.ACQUISITION_EQUIPMENT.scheme_designator
        for item in items
        for code in item.get("PurposeOfReferenceCodeSequence", [])
    )
    if not has_acquisition and acquisition is not None:
        items.insert(0, acquisition)
    return [*items, copy.deepcopy(processing)]


def set_identity(
    ds: Dataset, source: SourceSeries, series_uid: UID, series_number: int, description: str,
    instance_number: int, options: DerivationOptions, now: datetime,
) -> None:
    """New UIDs, numbers, description, image type and creation dates of one instance."""
    modality = source.modality
    ds.SOPClassUID = c.CLASSIC_IMAGE_STORAGE[modality]
    ds.SOPInstanceUID = new_uid(options.uid_root)
    ds.StudyInstanceUID = source.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    if source.frame_of_reference_uid:
        ds.FrameOfReferenceUID = source.frame_of_reference_uid
    elif "FrameOfReferenceUID" in ds:  # absent in the source (slice mode): kept absent
        del ds.FrameOfReferenceUID
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
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
    type2 = ["StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
             "Manufacturer"]
    if source.frame_of_reference_uid:
        type2.append("PositionReferenceIndicator")
    for keyword in type2:
        if keyword not in ds:  # Type 2 in General Study / Frame of Reference / Equipment
            setattr(ds, keyword, None)


def set_derivation(
    ds: Dataset, source: SourceSeries, contributing: Sequence[int], derivation: str,
    acquisition: Dataset | None, processing: Dataset,
) -> None:
    """Derivation description and code, source references and contributing equipment."""
    ds.DerivationDescription = derivation
    ds.DerivationCodeSequence = DicomSequence([code_item(c.SPATIAL_RESAMPLING)])
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
            [code_item(c.SOURCE_IMAGE_FOR_PROCESSING)]
        )
        items.append(item)
        instances[ref.sop_instance_uid] = ref.sop_class_uid
    ds.SourceImageSequence = DicomSequence(items)
    related = Dataset()
    related.StudyInstanceUID = source.study_instance_uid
    related.SeriesInstanceUID = source.series_instance_uid
    related.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item(c.SOURCE_SERIES_FOR_PROCESSING)]
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
    ds.ContributingEquipmentSequence = DicomSequence(
        equipment_history(ds.get("ContributingEquipmentSequence"), acquisition, processing)
    )
    if source.lossy:
        ds.LossyImageCompression = "01"
