"""Reads the Store Instances Response a DICOMweb destination answers to STOW-RS (PS3.18
10.5.3, Table I.1-1): which SOP Instances it lists as stored (ReferencedSOPSequence
(0008,1199), each with its WarningReason (0008,1196)) and as failed (FailedSOPSequence
(0008,1198), each with its FailureReason (0008,1197)).

The response data set comes as DICOM JSON (PS3.18 Annex F, ``application/dicom+json``)
or as Native DICOM Model XML (PS3.19 A.1, ``application/dicom+xml``). Anything else (an
empty body, an HTML page, JSON that is not a DICOM data set, a data set with neither
sequence) is ``NotAStoreResponse``: the caller must not count any instance as stored on
its strength. The body is read by the caller with a size cap (``dispatch_dicomweb``);
XML is parsed by the standard library's expat, which refuses entity expansion bombs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


class NotAStoreResponse(ValueError):
    """The answer is no Store Instances Response; the message says what it is instead,
    e.g. ``text/html`` or ``application/dicom+json without ReferencedSOPSequence or
    FailedSOPSequence``."""


@dataclass(frozen=True)
class StoreAnswer:
    """SOP Instance UID -> WarningReason (None: none given) of each instance the answer
    lists as stored, and -> FailureReason (None: none given) of each it lists as failed."""

    referenced: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int | None] = field(default_factory=dict)


def media_type(content_type: str | None) -> str:
    """``application/dicom+json`` of ``application/dicom+json; charset=utf-8``; "" if none."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_store_answer(body: bytes, content_type: str | None) -> StoreAnswer:
    """The Store Instances Response in ``body`` (answered with ``content_type``).

    JSON is read when the media type ends in ``json`` (or is missing / generic and the
    body starts with ``{`` or ``[``); XML when it ends in ``xml`` (or the body starts with
    ``<?xml`` / ``<NativeDicomModel``). Raises ``NotAStoreResponse`` otherwise, or when the
    body does not parse, or lists neither sequence.
    """
    kind = media_type(content_type)
    shown = kind or "no Content-Type"
    head = body[:1024].lstrip()
    if not head:
        raise NotAStoreResponse(f"{shown}, empty body")
    generic = kind in ("", "application/octet-stream", "text/plain")
    if kind.endswith("json") or (generic and head[:1] in (b"{", b"[")):
        answer = _from_json(body, shown)
    elif kind.endswith("xml") or (generic and head.startswith((b"<?xml", b"<NativeDicomModel"))):
        answer = _from_xml(body, shown)
    else:
        raise NotAStoreResponse(shown)
    if answer is None:
        raise NotAStoreResponse(f"{shown} without ReferencedSOPSequence or FailedSOPSequence")
    return answer


# -- DICOM JSON (PS3.18 F.2) -----------------------------------------------------------


def _from_json(body: bytes, shown: str) -> StoreAnswer | None:
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotAStoreResponse(f"{shown}, not JSON: {str(exc)[:80]}") from None
    if isinstance(payload, list) and len(payload) == 1:  # some servers wrap the data set
        payload = payload[0]
    if not _is_dataset(payload):
        raise NotAStoreResponse(f"{shown}, not a DICOM JSON data set")
    try:
        listed = [
            _json_items(payload, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
            _json_items(payload, FAILED_SOP_SEQUENCE, FAILURE_REASON),
        ]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise NotAStoreResponse(f"{shown}, malformed sequence items") from None
    if listed[0] is None and listed[1] is None:
        return None
    return StoreAnswer(listed[0] or {}, listed[1] or {})


def _is_dataset(payload: Any) -> bool:
    return isinstance(payload, dict) and all(
        isinstance(k, str) and _TAG.match(k) and isinstance(v, dict) for k, v in payload.items()
    )


def _json_values(element: Any) -> list[Any]:
    if not isinstance(element, dict):
        return []
    values = element.get("Value") or []
    return values if isinstance(values, list) else []


def _json_items(payload: dict[str, Any], tag: str, reason_tag: str) -> dict[str, int | None] | None:
    if tag not in payload:
        return None
    out: dict[str, int | None] = {}
    for item in _json_values(payload[tag]):
        uids = _json_values(item.get(REFERENCED_SOP_INSTANCE_UID))
        reasons = _json_values(item.get(reason_tag))
        if uids and isinstance(uids[0], str):
            out[_uid(uids[0])] = int(reasons[0]) if reasons else None
    return out


# -- Native DICOM Model XML (PS3.19 A.1) ----------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _from_xml(body: bytes, shown: str) -> StoreAnswer | None:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise NotAStoreResponse(f"{shown}, not XML: {exc}") from None
    if _local(root.tag) != "NativeDicomModel":
        raise NotAStoreResponse(f"{shown}, not a Native DICOM Model (<{_local(root.tag)}>)")
    try:
        listed = [
            _xml_items(root, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
            _xml_items(root, FAILED_SOP_SEQUENCE, FAILURE_REASON),
        ]
    except ValueError:
        raise NotAStoreResponse(f"{shown}, malformed sequence items") from None
    if listed[0] is None and listed[1] is None:
        return None
    return StoreAnswer(listed[0] or {}, listed[1] or {})


def _xml_attribute(parent: ElementTree.Element, tag: str) -> ElementTree.Element | None:
    for child in parent:
        if _local(child.tag) == "DicomAttribute" and (child.get("tag") or "").upper() == tag:
            return child
    return None


def _xml_first_value(parent: ElementTree.Element, tag: str) -> str | None:
    attribute = _xml_attribute(parent, tag)
    if attribute is None:
        return None
    for child in attribute:
        if _local(child.tag) == "Value" and child.text:
            return child.text
    return None


def _xml_items(
    root: ElementTree.Element, tag: str, reason_tag: str
) -> dict[str, int | None] | None:
    sequence = _xml_attribute(root, tag)
    if sequence is None:
        return None
    out: dict[str, int | None] = {}
    for item in sequence:
        if _local(item.tag) != "Item":
            continue
        uid = _xml_first_value(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _xml_first_value(item, reason_tag)
        if uid:
            out[_uid(uid)] = int(reason.strip()) if reason else None
    return out


def _uid(value: str) -> str:
    return value.strip().rstrip("\x00").strip()
