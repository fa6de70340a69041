"""Enhanced (multi-frame) to classic: one classic CT/MR image header per frame.

Enhanced sources produce classic single-frame instances: every viewer, PACS and workstation
displays CT/MR Image Storage, whereas multi-frame support is still patchy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node import codes as c
from dicom_node.derive.functional_groups import functional_group_items

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


#: Functional groups of a legacy converted instance: their attributes came from classic images
#: and go back as they are.
_CONVERTED_GROUPS = (
    "UnassignedSharedConvertedAttributesSequence",
    "UnassignedPerFrameConvertedAttributesSequence",
)

#: Functional groups of an enhanced instance whose first-level attributes a classic header takes
#: over, restricted to :data:`_CLASSIC_MODULE_KEYWORDS` of the modality.
_FUNCTIONAL_GROUPS = (
    "CTXRayDetailsSequence",
    "CTAcquisitionDetailsSequence",
    "CTReconstructionSequence",
    "CTExposureSequence",
    "CTGeometrySequence",
    "CTTableDynamicsSequence",
    "MRTimingAndRelatedParametersSequence",
    "MRImagingModifierSequence",
    "MRReceiveCoilSequence",
    "MRTransmitCoilSequence",
    "MRFOVGeometrySequence",
    "MRModifierSequence",
    "MRAveragesSequence",
)

#: Attributes of the classic CT Image module (PS3.3 C.8.2.1) and MR Image module (C.8.3.1)
#: that enhanced functional groups can supply; anything else in those groups (operating modes,
#: SAR sequences, echo train details...) has no place in the classic IOD and is left out.
_CLASSIC_MODULE_KEYWORDS: dict[str, frozenset[str]] = {
    "CT": frozenset({
        "KVP", "DataCollectionDiameter", "DataCollectionCenterPatient", "ReconstructionDiameter",
        "ReconstructionTargetCenterPatient", "DistanceSourceToDetector",
        "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight", "RotationDirection",
        "ExposureTime", "XRayTubeCurrent", "Exposure", "ExposureInuAs", "FilterType",
        "GeneratorPower", "FocalSpots", "ConvolutionKernel", "RevolutionTime",
        "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation",
        "SpiralPitchFactor", "ExposureModulationType", "CTDIvol", "CTDIPhantomTypeCodeSequence",
        "WaterEquivalentDiameter", "WaterEquivalentDiameterCalculationMethodCodeSequence",
    }),
    "MR": frozenset({
        "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
        "SequenceName", "AngioFlag", "RepetitionTime", "EchoTime", "InversionTime",
        "NumberOfAverages", "ImagingFrequency", "ImagedNucleus", "EchoNumbers",
        "MagneticFieldStrength", "NumberOfPhaseEncodingSteps", "EchoTrainLength",
        "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth", "NominalInterval",
        "BeatRejectionFlag", "LowRRValue", "HighRRValue", "IntervalsAcquired",
        "IntervalsRejected", "PVCRejection", "SkipBeats", "HeartRate", "CardiacNumberOfImages",
        "TriggerWindow", "ReconstructionDiameter", "ReceiveCoilName", "TransmitCoilName",
        "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "FlipAngle", "SAR",
        "VariableFlipAngleFlag", "dBdt", "TemporalPositionIdentifier",
        "NumberOfTemporalPositions", "TemporalResolution",
    }),
}


def _merge_missing(
    target: Dataset, items: Iterable[Dataset], allowed: frozenset[str] | None = None
) -> None:
    """Copy first-level attributes of ``items`` into ``target`` where ``target`` lacks them.

    ``allowed``: only these keywords (``None``: every standard attribute).
    """
    for item in items:
        for elem in item:
            if elem.tag.is_private or elem.tag in target:
                continue
            if allowed is not None and elem.keyword not in allowed:
                continue
            target.add(copy.deepcopy(elem))


def classic_from_enhanced(ds: Dataset, frame_index: int, modality: str) -> Dataset:
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
    for keyword in _CONVERTED_GROUPS:
        _merge_missing(out, functional_group_items(ds, frame_index, keyword))
    allowed = _CLASSIC_MODULE_KEYWORDS.get(modality, frozenset())
    for keyword in _FUNCTIONAL_GROUPS:
        _merge_missing(out, functional_group_items(ds, frame_index, keyword), allowed)
    content = functional_group_items(ds, frame_index, "FrameContentSequence")
    acq_dt = str(content[0].get("FrameAcquisitionDateTime", "")) if content else ""
    acq_dt = acq_dt or str(ds.get("AcquisitionDateTime", "") or "")
    if acq_dt and "AcquisitionDate" not in out:
        out.AcquisitionDate = acq_dt[:8]
        if len(acq_dt) > 8:
            out.AcquisitionTime = re.split(r"[+-]", acq_dt[8:])[0]
    if "AcquisitionNumber" not in out:
        number = content[0].get("FrameAcquisitionNumber") if content else None
        out.AcquisitionNumber = number if number is not None else None
    echoes = functional_group_items(ds, frame_index, "MREchoSequence")
    if echoes and "EchoTime" not in out:
        out.EchoTime = echoes[0].get("EffectiveEchoTime")
    flips = functional_group_items(ds, frame_index, "MRTimingAndRelatedParametersSequence")
    if flips and "FlipAngle" not in out and flips[0].get("FlipAngle") is not None:
        out.FlipAngle = flips[0].FlipAngle
    pvt = functional_group_items(ds, frame_index, "PixelValueTransformationSequence")
    rescale_type = str(pvt[0].get("RescaleType", "") or "") if pvt else ""
    if modality == "CT" and rescale_type and not out.get("RescaleType"):
        out.RescaleType = rescale_type  # the units stay what the source says
    _map_enhanced_contrast(out)
    anatomy = functional_group_items(ds, frame_index, "FrameAnatomySequence")
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
