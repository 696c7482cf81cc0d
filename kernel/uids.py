"""DICOM UID checks and deterministic UID derivation.

UIDs become folder and file names in the spool, so they are validated strictly before
use: only digits and dots, no empty or leading-zero components, at most 64 characters
(PS3.5 section 9.1).
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

# Root for UIDs this node derives itself: the "2.25" UUID-derived arc (PS3.5 B.2), which
# needs no registered organisation root and cannot collide with scanner-issued UIDs.
_UUID_ARC = "2.25."


class InvalidUIDError(ValueError):
    """A UID that is not a well-formed DICOM UID (and must never become a path part)."""


def is_valid_uid(uid: object) -> bool:
    """True when ``uid`` is a syntactically valid DICOM UID."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def require_uid(uid: object, what: str) -> str:
    """Return ``uid`` stripped of DICOM padding, or raise naming the attribute."""
    text = str(uid).strip().rstrip("\x00") if uid is not None else ""
    if not is_valid_uid(text):
        raise InvalidUIDError(f"{what} {text!r} is not a valid DICOM UID")
    return text


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: the same inputs always give the same UID.

    Used for result objects, so that re-running a pipeline on the same source series with
    the same model version produces the same SeriesInstanceUID / SOPInstanceUID and the
    PACS replaces the earlier object instead of storing a duplicate.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    # 128 bits as a decimal integer, like a UUID under the 2.25 arc (max 39 digits + 5).
    return _UUID_ARC + str(int.from_bytes(digest[:16], "big"))
