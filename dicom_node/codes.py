"""DICOM codes, UIDs and fixed strings used by srnode, in one place.

Coded concepts come from :data:`pydicom.sr.codedict.codes` (the DICOM content mapping resource);
only strings that the standard leaves to the implementation are literals here.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts

# --- Coded concepts (CID 7203, 7202, 7210, 7005) ---------------------------------------------

#: CID 7203 Image Derivation: the code that fits super-resolution (DCM 113085).
SPATIAL_RESAMPLING: Code = codes.DCM.SpatialResampling
#: CID 7202 Source Image Purpose of Reference (DCM 121322).
SOURCE_IMAGE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation
#: CID 7210 Related Series Purpose of Reference (DCM 121323).
SOURCE_SERIES_FOR_PROCESSING: Code = codes.DCM.SourceSeriesForImageProcessingOperation
#: CID 7005 Contributing Equipment Purpose: the scanner (DCM 109101).
ACQUISITION_EQUIPMENT: Code = codes.DCM.AcquisitionEquipment
#: CID 7005 Contributing Equipment Purpose: the node that created the instances (DCM 109102).
PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment

# --- Fixed strings -----------------------------------------------------------------------------

#: Image Type value 4 (implementation specific): marks every instance srnode creates.
IMAGE_TYPE_TOKEN = "SRNODE"
#: Image Type values 1 and 2 of every derived instance.
IMAGE_TYPE_DERIVED = ("DERIVED", "SECONDARY")
#: Image Type value 3 of a derived CT image (C.8.2.1.1.1: AXIAL covers any cross-section).
CT_IMAGE_TYPE_VALUE3 = "AXIAL"
#: CT Image Type value 3 that is kept when the source is a localizer.
CT_IMAGE_TYPE_LOCALIZER = "LOCALIZER"
#: Image Type value 3 of a derived MR image (C.8.3.1.1.1 defined term).
MR_IMAGE_TYPE_VALUE3 = "OTHER"
#: Manufacturer's Model Name of the processing equipment item.
PROCESSING_MODEL_NAME = "srnode"
#: Implementation Class UID written in the File Meta Information (UUID-derived, fixed).
IMPLEMENTATION_CLASS_UID = UID("2.25.329979268997415275830400216494987702060")
#: Implementation Version Name prefix (at most 16 characters with the version appended).
IMPLEMENTATION_VERSION_PREFIX = "SRNODE_"
#: Largest value of an IS (Integer String) attribute such as Series Number.
IS_MAX = 2**31 - 1
#: Longest ST value (Derivation Description, Contribution Description).
ST_MAX_CHARS = 1024
#: Longest LO value (Series Description).
LO_MAX_CHARS = 64

# --- SOP classes and transfer syntaxes ---------------------------------------------------------

#: Classic single-frame image storage SOP classes srnode reads and writes, by modality.
CLASSIC_IMAGE_STORAGE: dict[str, UID] = {"CT": CTImageStorage, "MR": MRImageStorage}
#: Multi-frame image storage SOP classes srnode reads, by modality.
ENHANCED_IMAGE_STORAGE: dict[UID, str] = {
    EnhancedCTImageStorage: "CT",
    EnhancedMRImageStorage: "MR",
    LegacyConvertedEnhancedCTImageStorage: "CT",
    LegacyConvertedEnhancedMRImageStorage: "MR",
}
#: Storage SOP classes srnode enhances (CT/MR images).
ENHANCEABLE_SOP_CLASSES: tuple[UID, ...] = (
    *CLASSIC_IMAGE_STORAGE.values(), *ENHANCED_IMAGE_STORAGE
)
#: Every Storage SOP class (pynetdicom's list of the standard's storage SOP classes, plus those
#: srnode enhances): accepted by default, so that a PACS forwarding whole studies (dose reports,
#: secondary captures, presentation states) never fails; only CT/MR images are enhanced.
ALL_STORAGE_SOP_CLASSES: tuple[UID, ...] = tuple(
    dict.fromkeys(
        [*ENHANCEABLE_SOP_CLASSES,
         *(UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts)]
    )
)


def accepted_sop_classes(accept_all_storage: bool) -> tuple[UID, ...]:
    """Storage SOP classes offered at association negotiation (``[node] accept_all_storage``).

    With ``accept_all_storage = false`` only those srnode enhances; every other SOP class is
    then refused at negotiation.
    """
    return ALL_STORAGE_SOP_CLASSES if accept_all_storage else ENHANCEABLE_SOP_CLASSES
#: Transfer syntaxes accepted: uncompressed, deflate and every compressed syntax the installed
#: decoders (pylibjpeg, openjpeg, RLE, gdcm) can decode.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: Accepted transfer syntaxes whose pixel data is encapsulated (compressed).
ENCAPSULATED_TRANSFER_SYNTAXES: frozenset[UID] = frozenset(
    ts for ts in ACCEPTED_TRANSFER_SYNTAXES if ts.is_encapsulated
)
#: ``[[destinations]] transfer_syntax`` names and the (lossless) output transfer syntaxes the
#: derived series can be written or re-encoded in; the first is the default.
OUTPUT_TRANSFER_SYNTAX_BY_NAME: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000-lossless": JPEG2000Lossless,
}
#: Output transfer syntaxes the derived-series builder can encode (all lossless).
OUTPUT_TRANSFER_SYNTAXES: tuple[UID, ...] = tuple(OUTPUT_TRANSFER_SYNTAX_BY_NAME.values())
#: Transfer syntaxes whose encoding loses information: a source in one of them is lossy.
LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEG2000,
        JPEGLSNearLossless,
        "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression (of a lossy JPEG)
        "1.2.840.10008.1.2.4.112",  # JPEG XL
    }
)
