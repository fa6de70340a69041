"""DIMSE status codes srnode answers with or reads (PS3.4 Annex B.2.3, PS3.7 Annex C).

Used only at the network edge (``dicom_node.network``); inner layers raise typed errors.
"""

from __future__ import annotations

SUCCESS = 0x0000
#: Refused: Out of Resources (disk below the configured floor).
OUT_OF_RESOURCES = 0xA700
#: Refused: Out of Resources, used when the index database cannot commit (the sender retries).
OUT_OF_RESOURCES_INDEX = 0xA701
#: Error: Data Set does not match SOP Class.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: Cannot understand (the data set could not be parsed).
CANNOT_UNDERSTAND = 0xC000
#: Error: Cannot understand: a required UID is missing or invalid.
INVALID_UID = 0xC001
#: Error: Cannot understand: the image attributes are inconsistent (e.g. pixel data too short).
INVALID_IMAGE = 0xC002
#: Error: Cannot understand: the instance is larger than ``[node] max_instance_mb``.
INSTANCE_TOO_LARGE = 0xC003
#: Failure: Processing failure (unexpected error; logged with a reason).
PROCESSING_FAILURE = 0x0110
#: Failure: Unrecognized operation (a DIMSE command the acceptor does not provide).
UNRECOGNIZED_OPERATION = 0x0211
#: Failure: SOP class not supported (the SCU found no accepted presentation context).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: C-STORE warnings a destination may answer with; the instance counts as stored
#: (coercion of data elements, elements discarded, data set does not match SOP class).
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
