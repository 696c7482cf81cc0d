"""DICOM UID checks and deterministic UID derivation.

A UID is conformant (PS3.5 9.1) when it has at most 64 characters, only digits and dots,
and no empty component or component with a leading zero. Scanners, exporters and
anonymisers in the field send UIDs that break the last rule (``1.2.3.0604688119``) or pad
the value with NULs or spaces beyond 64 bytes; a PACS such as Orthanc stores them, so the
node accepts them too (``accept_uid``) and reports why they are not conformant. What it
never accepts: characters other than digits and dots, a value not starting with a digit, more
than 64 characters once the padding is gone (so a UID can always be a file or folder name:
no ``/``, never ``.``, ``..`` or a hidden name, and it fits the database's UID columns).
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# Digits and dots, starting with a digit: never "." or ".." or hidden, safe as a path part.
_TOLERATED_RE = re.compile(r"^[0-9][0-9.]*$")
MAX_UID_LENGTH = 64

# Root for UIDs this node derives itself: the "2.25" UUID-derived arc (PS3.5 B.2), which
# needs no registered organisation root and cannot collide with scanner-issued UIDs.
_UUID_ARC = "2.25."


class InvalidUIDError(ValueError):
    """A value that cannot be used as a UID (and must never become a path part)."""


def is_valid_uid(uid: object) -> bool:
    """True when ``uid`` is a conformant DICOM UID (PS3.5 9.1)."""
    return isinstance(uid, str) and 0 < len(uid) <= MAX_UID_LENGTH and bool(_UID_RE.match(uid))


def _unpadded(uid: object) -> str:
    """The value without the padding senders add: NULs and spaces at either end."""
    return str(uid).strip(" \x00") if uid is not None else ""


def accept_uid(uid: object, what: str) -> tuple[str, str | None]:
    """``(uid, problem)``: the UID as it will be stored and referenced, and why it is not
    conformant (None when it is).

    Padding (NULs, spaces) is removed; components with a leading zero, empty components
    (``1.2..3``, a trailing dot) or a single component are tolerated and reported. Raises
    ``InvalidUIDError`` naming the attribute for other characters, a value that does not
    start with a digit and more than 64 characters.
    """
    text = _unpadded(uid)
    if is_valid_uid(text):
        return text, None
    if not text:
        raise InvalidUIDError(f"{what} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUIDError(
            f"{what} {text[:80]!r} has {len(text)} characters, more than {MAX_UID_LENGTH}"
        )
    if not _TOLERATED_RE.match(text):
        raise InvalidUIDError(
            f"{what} {text!r} is not a DICOM UID (digits and dots, starting with a digit)"
        )
    components = text.split(".")
    leading = [c for c in components if len(c) > 1 and c.startswith("0")]
    if leading:
        return text, f"{what} {text} has a component with a leading zero ({leading[0]})"
    if "" in components:
        return text, f"{what} {text} has an empty component"
    return text, f"{what} {text} has a single component"


def require_uid(uid: object, what: str) -> str:
    """The UID without padding, tolerated as ``accept_uid`` tolerates it; raises
    ``InvalidUIDError`` naming the attribute when it cannot be used."""
    return accept_uid(uid, what)[0]


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: the same inputs always give the same UID.

    Used for result objects, so that re-running a pipeline on the same source series with
    the same model version produces the same SeriesInstanceUID / SOPInstanceUID and the
    PACS replaces the earlier object instead of storing a duplicate.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    # 128 bits as a decimal integer, like a UUID under the 2.25 arc (max 39 digits + 5).
    return _UUID_ARC + str(int.from_bytes(digest[:16], "big"))
