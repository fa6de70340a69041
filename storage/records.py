"""Plain records that the receive room hands to ``storage`` (no DICOM parsing here).

``storage`` indexes records; turning a DICOM data set into a record is the job of
:mod:`dicom_node.receive.header`.  The column lengths of the index live here, once: the record
builder clips text to them and :mod:`storage.models` sizes its columns with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Longest stored value of each indexed text attribute (the VR's maximum length; PN allows
#: 5 components of 64 characters plus separators).
TEXT_LIMITS: dict[str, int] = {
    "patient_id": 64,
    "patient_name": 324,
    "patient_birth_date": 8,
    "study_date": 8,
    "accession_number": 16,
    "study_description": 64,
    "modality": 16,
    "body_part_examined": 64,
    "series_description": 64,
    "image_type": 256,
    "ae_title": 16,
}
#: Longest UID (PS3.5 9.1).
UID_LENGTH = 64
#: Longest recorded reason why a series is not enhanced.
SKIP_REASON_LENGTH = 256
#: Image Type values (3 onward) that mark a secondary derived object even when value 2 says
#: PRIMARY: reformats, projections and renderings of an acquisition, not an acquisition.
SECONDARY_IMAGE_TYPE_VALUES = frozenset({
    "MPR", "REFORMATTED", "CPR", "CURVED", "MIP", "MINIP", "MNIP", "PROJECTION IMAGE",
    "VOLUME RENDERING", "VRT", "SSD", "SURFACE",
})


@dataclass
class InstanceHeader:
    """What the node indexes about one received instance (PHI fields are never logged).

    Attributes
    ----------
    produced_by_node
        Whether the instance carries srnode's own output marker (never queued again).
    enhanceable
        Whether the SOP class is one srnode can enhance (a CT/MR image storage class); other
        instances are stored (or discarded) but never queued.
    """

    patient_id: str
    patient_name: str
    patient_birth_date: str
    study_instance_uid: str
    study_date: str
    accession_number: str
    study_description: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    image_type: tuple[str, ...]
    produced_by_node: bool = False
    enhanceable: bool = True

    def __repr__(self) -> str:
        """Describe the instance by UIDs only (no PHI)."""
        return (
            f"InstanceHeader(study={self.study_instance_uid}, series={self.series_instance_uid}, "
            f"sop={self.sop_instance_uid}, modality={self.modality})"
        )

    @property
    def is_derived(self) -> bool:
        r"""Whether the instance is a secondary derived object (skipped unless a rule says so).

        ImageType ``DERIVED\SECONDARY`` (anything but PRIMARY as value 2), or DERIVED with a
        reformat, projection or rendering value (:data:`SECONDARY_IMAGE_TYPE_VALUES`).  Many
        scanners label reconstructed axial images ``DERIVED\PRIMARY``: those are acquisitions.
        """
        return is_secondary_derived(self.image_type)


def is_secondary_derived(image_type: Sequence[str]) -> bool:
    r"""Whether Image Type values mark a secondary derived object.

    ``DERIVED`` with value 2 other than ``PRIMARY``, or ``DERIVED\PRIMARY`` with a reformat,
    projection or rendering value (:data:`SECONDARY_IMAGE_TYPE_VALUES`).
    """
    values = [v.strip().upper() for v in image_type]
    if not values or values[0] != "DERIVED":
        return False
    if len(values) < 2 or values[1] != "PRIMARY":
        return True
    return any(v in SECONDARY_IMAGE_TYPE_VALUES for v in values[2:])
