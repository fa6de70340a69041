"""The DICOM header model: a received data set becomes a plain :class:`InstanceHeader` record.

Both the full pydicom path (:func:`header_from_dataset`) and the single-pass header scan
(:mod:`dicom_node.receive.header_scan`) end in :func:`make_header`, so text clipping and the
own-output marker are decided in one place.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.codes import ENHANCEABLE_SOP_CLASSES, IMAGE_TYPE_TOKEN
from storage.errors import InvalidInstanceError, InvalidUIDError
from storage.filestore import validate_uid
from storage.records import TEXT_LIMITS, InstanceHeader

# (is_implicit_VR, is_little_endian) of a bare data set -> its transfer syntax
_ENCODING_TO_TS = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
_TEXT_FIELDS = (
    "patient_id", "patient_name", "patient_birth_date", "study_date", "accession_number",
    "study_description", "modality", "body_part_examined", "series_description",
)


def make_header(**values: Any) -> InstanceHeader:
    """Build the record from already decoded values: clip text, mark srnode's own output.

    Parameters
    ----------
    **values
        The :class:`InstanceHeader` fields except ``produced_by_node`` and ``enhanceable``
        (decided here from Image Type and SOP Class UID); text fields may be
        longer than their column and are clipped here.

    Returns
    -------
    InstanceHeader
        The record.
    """
    for name in _TEXT_FIELDS:
        text = str(values.get(name, "") or "")
        # NUL is no valid character in DICOM text; PostgreSQL text columns refuse it
        values[name] = text.replace("\x00", "").strip()[: TEXT_LIMITS[name]]
    values["modality"] = values["modality"].upper()
    image_type = tuple(values.get("image_type", ()))
    values["image_type"] = image_type
    values["produced_by_node"] = IMAGE_TYPE_TOKEN in (t.upper() for t in image_type)
    values["enhanceable"] = str(values.get("sop_class_uid", "")) in ENHANCEABLE_SOP_CLASSES
    return InstanceHeader(**values)


def _text(ds: Dataset, keyword: str) -> str:
    """Return an attribute as a string ('' when absent or empty)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    """Return an IS/US attribute as int, or None when absent or unparsable."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    """Return a required UID attribute, validated."""
    value = ds.get(keyword)
    if value is None or str(value).strip("\x00 ") == "":
        raise InvalidInstanceError(f"dataset has no {keyword}")
    try:
        return validate_uid(str(value).strip("\x00 "))
    except InvalidUIDError as exc:
        raise InvalidUIDError(f"{keyword}: {exc}") from exc


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Build a header from a dataset (pixel data is not needed).

    Parameters
    ----------
    ds
        The dataset; ``ds.file_meta`` supplies the transfer syntax when present.

    Returns
    -------
    InstanceHeader
        The header.

    Raises
    ------
    InvalidInstanceError
        If the Study/Series/SOP Instance UID or the SOP Class UID is missing.
    InvalidUIDError
        If one of those UIDs is malformed.
    """
    study = _uid(ds, "StudyInstanceUID")
    series = _uid(ds, "SeriesInstanceUID")
    sop = _uid(ds, "SOPInstanceUID")
    meta = getattr(ds, "file_meta", None)
    if "SOPClassUID" in ds:
        sop_class = _uid(ds, "SOPClassUID")
    elif meta is not None and "MediaStorageSOPClassUID" in meta:
        sop_class = _uid(meta, "MediaStorageSOPClassUID")
    else:
        raise InvalidInstanceError("dataset has no SOPClassUID")
    ts = ""
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = _uid(meta, "TransferSyntaxUID")
    else:
        encoding = getattr(ds, "original_encoding", None)
        if encoding and tuple(encoding) in _ENCODING_TO_TS:
            ts = str(_ENCODING_TO_TS[tuple(encoding)])
    if not ts:
        raise InvalidInstanceError("transfer syntax unknown (no file meta, no encoding)")
    raw_type = ds.get("ImageType")
    if raw_type is None or raw_type == "":
        image_type: tuple[str, ...] = ()
    elif isinstance(raw_type, str):
        image_type = tuple(t.strip() for t in raw_type.split("\\"))
    else:
        image_type = tuple(str(t).strip() for t in raw_type)
    return make_header(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        study_instance_uid=study,
        study_date=_text(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=ts,
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        image_type=image_type,
    )
