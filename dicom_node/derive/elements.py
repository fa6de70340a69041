"""Element values every part of the builder writes: DS strings, code items, new UIDs."""

from __future__ import annotations

import math
import re

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import format_number_as_ds


class DerivationError(ValueError):
    """The result cannot be turned into a compliant derived series."""


_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def format_ds(value: float) -> str:
    """Format a float as a DS string (at most 16 characters, no ``-0``)."""
    v = round(float(value), 6) + 0.0
    if not math.isfinite(v):
        raise DerivationError(f"non-finite decimal value {value!r}")
    return format_number_as_ds(v)


def new_uid(root: str) -> UID:
    """Return a new UID under ``root`` (``2.25`` UUID form when empty)."""
    if not root:
        return generate_uid(prefix=None)
    return generate_uid(prefix=root.rstrip(".") + ".")


def check_uid_root(root: str) -> None:
    """Refuse UID roots that cannot prefix valid UIDs."""
    if root and (not _UID_ROOT_RE.match(root.rstrip(".")) or len(root) > 40):
        raise DerivationError(f"uid_root {root!r} is not a valid UID root of at most 40 characters")


def code_item(code: Code) -> Dataset:
    """Return a Code Sequence item for ``code``."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        item.CodingSchemeVersion = code.scheme_version
    item.CodeMeaning = code.meaning
    return item
