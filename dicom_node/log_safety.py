"""Neutralise peer-controlled values before they reach a log line or the audit log.

A sender controls the AE titles it announces, the UIDs in its command sets and data sets and
every text it puts there.  A broken sender may build a "UID" from a patient name, and a hostile
one may put a newline into it to forge a whole log line, or send 64 KiB of it to fill three log
files per refusal.  Everything such a peer sends passes through one of these functions on its
way to a log or audit record:

- :func:`safe_uid`: a valid UID is kept as is; anything else becomes ``<invalid UID #hash>``,
  a short, stable hash that lets an administrator correlate entries without seeing the value.
- :func:`safe_text`: control and non-ASCII characters escaped, length bounded (AE titles,
  reasons quoting peer data).
- :class:`SafeFormatter`: a logging formatter that escapes line breaks left in a message, the
  last line of defence against forged log lines.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from storage.errors import InvalidUIDError
from storage.filestore import validate_uid

#: Longest peer-controlled text kept in a log line (longer values are cut and marked).
MAX_TEXT_LENGTH = 64
_CONTROL_RE = re.compile(r"[^\x20-\x7e]")


def is_valid_uid(value: object) -> bool:
    """Return whether ``value`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Parameters
    ----------
    value
        Anything a peer sent.

    Returns
    -------
    bool
        ``True`` for what :func:`storage.filestore.validate_uid` accepts (PS3.5 9.1).
    """
    try:
        validate_uid(value)  # type: ignore[arg-type]
    except InvalidUIDError:
        return False
    return True


def is_valid_ae_title(value: object) -> bool:
    """Return whether ``value`` (stripped) is a valid AE title (PS3.5 AE).

    Parameters
    ----------
    value
        Anything a peer sent.

    Returns
    -------
    bool
        ``True`` for 1-16 printable ASCII characters without a backslash.
    """
    if not isinstance(value, str):
        return False
    text = value.strip()
    return 0 < len(text) <= 16 and "\\" not in text and not _CONTROL_RE.search(text)


def short_hash(value: str | bytes) -> str:
    """Return 8 hex digits of a SHA-256 of ``value`` (for correlating, not for recovering).

    Parameters
    ----------
    value
        The value to fingerprint.

    Returns
    -------
    str
        The fingerprint.
    """
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()[:8]


def safe_uid(value: object) -> str:
    """Return ``value`` if it is a valid UID, else a marker with a short hash of it.

    Parameters
    ----------
    value
        A UID as sent by a peer (any type; ``None`` and ``""`` give ``""``).

    Returns
    -------
    str
        The UID, ``""`` or ``"<invalid UID #1a2b3c4d>"``.
    """
    if value is None or value == "":
        return ""
    text = value if isinstance(value, str) else str(value)
    if is_valid_uid(text):
        return text
    return f"<invalid UID #{short_hash(text)}>"


def safe_ae(value: object) -> str:
    """Return a valid AE title as is, anything else as a marker with a short hash of it.

    Valid: 1-16 printable ASCII characters without backslash (PS3.5 AE).

    Parameters
    ----------
    value
        An AE title as sent by a peer.

    Returns
    -------
    str
        The AE title (stripped), ``""`` or ``"<invalid AE title #1a2b3c4d>"``.
    """
    if value is None:
        return ""
    text = (value if isinstance(value, str) else str(value)).strip()
    if not text:
        return ""
    if is_valid_ae_title(text):
        return text
    return f"<invalid AE title #{short_hash(text)}>"


def safe_text(value: object, limit: int = MAX_TEXT_LENGTH) -> str:
    """Escape control and non-ASCII characters and bound the length of a peer-supplied text.

    Parameters
    ----------
    value
        Text from a peer (an AE title, a reason quoting peer data).
    limit
        Most characters kept before the escaping; longer text is cut and marked with ``...``
        and a short hash of the whole value.

    Returns
    -------
    str
        Printable ASCII only, at most about ``4 * limit + 20`` characters.
    """
    text = value if isinstance(value, str) else str(value)
    suffix = ""
    if len(text) > limit:
        suffix = f"...#{short_hash(text)}"
        text = text[:limit]
    return _CONTROL_RE.sub(_escape, text) + suffix


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Neutralise the values of an audit record: ``*_uid`` keys as UIDs, other strings as text.

    Parameters
    ----------
    fields
        Field name -> value (nested lists and dicts are handled; numbers and booleans kept).

    Returns
    -------
    dict
        A new mapping with every string value made safe.
    """
    return {key: _safe_value(key, value) for key, value in fields.items()}


def _safe_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if key.endswith("_uid") or key.endswith("_syntax"):
            return safe_uid(value)
        if key.endswith("_ae"):
            return safe_ae(value)
        return safe_text(value, limit=512)
    if isinstance(value, dict):
        return safe_fields(value)
    if isinstance(value, list | tuple):
        return [_safe_value(key.removesuffix("es").removesuffix("s"), v) for v in value]
    return value


#: Loggers of libraries that quote values received from peers in their messages.
QUOTING_LIBRARIES = ("pynetdicom",)
_QUOTED_RE = re.compile(r"'[^']*'")


def _redact_quoted(match: re.Match[str]) -> str:
    return f"'<value #{short_hash(match.group(0)[1:-1])}>'"


class SafeFormatter(logging.Formatter):
    """A formatter that keeps one record on one line: CR, LF and other controls are escaped.

    Records of :data:`QUOTING_LIBRARIES` (pynetdicom writes e.g. "Transfer Syntax Name '...'
    is non-conformant" with the peer's value) have every quoted value replaced by a short hash.
    Tracebacks (``exc_info``) are srnode's own and keep their line breaks; only the message
    (which may quote peer data) is escaped.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        """Format the record's message with control characters escaped.

        Parameters
        ----------
        record
            The log record (its ``message`` was set by :meth:`logging.Formatter.format`).

        Returns
        -------
        str
            The formatted line.
        """
        message = record.message
        if record.name.split(".", 1)[0] in QUOTING_LIBRARIES:
            message = record.message = _QUOTED_RE.sub(_redact_quoted, message)
        if _CONTROL_RE.search(message):
            record.message = re.sub(r"[\x00-\x1f\x7f]", _escape, message)
        return super().formatMessage(record)
