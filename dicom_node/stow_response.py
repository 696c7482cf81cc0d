"""The STOW-RS Store Instances Response: per-instance outcomes, the response data set in
DICOM JSON or XML, and the HTTP status (PS3.18 10.5.3 and Annex I).

Failure Reason (0008,1197) values, PS3.18 Table I.2-2 (and the listener's C-STORE
statuses, ``dicom_node.scp``, for the same causes):

- ``0xA700`` Refused: Out of Resources: the spool is below ``min_free_bytes`` or its disk
  is full, the file could not be written, the database did not take the instance's row,
  or the part is larger than ``web.stow_max_instance_bytes``; nothing is stored.
- ``0xC000`` Error: Cannot Understand: the part is not a DICOM file (not
  ``application/dicom``, cannot be parsed, truncated, UIDs missing or unusable) or its
  series already belongs to another study.
- ``0xC409`` (implementation-specific, in the Cannot Understand range as Table I.2-2
  allows, the code dcm4chee-arc uses): the instance belongs to another study than the one
  ``POST /dicomweb/studies/{study}`` names.
- ``0x0110`` Processing failure: the node failed unexpectedly on this part.

Warning Reason (0008,1196), Table I.2-1: ``0xB007`` Data Set does not match SOP Class:
stored, but a UID breaks PS3.5 9.1 (leading zero, empty component) and was kept as sent.

HTTP status (Table 10.5.3-1): 200 every instance stored without warning; 202 some stored,
others failed or warned; 409 none stored; 503 none stored and every failure is the node's
(out of resources: retry later, ``Retry-After``); 400 none stored and the body is not
valid multipart. Each failure and warning also travels as a ``Warning: 299`` header
naming the part and the reason (PS3.18 8.x recommends the DICOM status code in it).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.ingest import RETRY_LATER, Cause, Ingested
from kernel.uids import accept_uid

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC409
PROCESSING_FAILURE = 0x0110
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007

FAILURE_OF: dict[Cause, int] = {
    Cause.CORRUPT: CANNOT_UNDERSTAND,
    Cause.SERIES_CONFLICT: CANNOT_UNDERSTAND,
    Cause.OTHER_STUDY: STUDY_MISMATCH,
    Cause.SPOOL_FULL: OUT_OF_RESOURCES,
    Cause.WRITE_FAILED: OUT_OF_RESOURCES,
    Cause.NOT_RECORDED: OUT_OF_RESOURCES,
}
JSON_TYPE = "application/dicom+json"
XML_TYPE = "application/dicom+xml"
NATIVE_DICOM = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
# Warning headers per response at most (then one saying how many were left out).
MAX_WARNINGS = 20
RETRY_AFTER_S = 60


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part: stored (``failure`` None), perhaps with a ``warning``
    code, or failed with a Failure Reason. ``reason`` names the problem in words;
    ``retry_later``: the failure is the node's (resources), not the instance's."""

    index: int
    sop_class_uid: str | None
    sop_uid: str | None
    study_uid: str | None = None
    failure: int | None = None
    warning: int | None = None
    reason: str | None = None
    retry_later: bool = False

    @property
    def stored(self) -> bool:
        return self.failure is None


def identify(head: bytes) -> tuple[str | None, str | None, str | None]:
    """(SOP Class UID, SOP Instance UID, Study Instance UID) as far as the first bytes of
    a part that was not stored tell (data set first, file meta second); None for what
    cannot be read or is no usable UID."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(head),
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
    except Exception:  # not DICOM, or the head ends inside the file meta
        return None, None, None
    meta = getattr(ds, "file_meta", Dataset())
    found = (
        ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID"),
        ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"),
        ds.get("StudyInstanceUID"),
    )
    return tuple(_uid_or_none(v) for v in found)  # type: ignore[return-value]


def _uid_or_none(value: object) -> str | None:
    try:
        return accept_uid(value, "UID")[0] if value else None
    except ValueError:
        return None


def of_ingested(index: int, done: Ingested, head: bytes) -> PartOutcome:
    """The outcome of a part the receive path took (``ingest.ReceivePath.receive``)."""
    header = done.header
    if header is None:
        sop_class, sop_uid, study_uid = identify(head)
    else:
        sop_class, sop_uid, study_uid = header.sop_class_uid, header.sop_uid, header.study_uid
    if done.cause is not None:
        return PartOutcome(
            index,
            sop_class,
            sop_uid,
            study_uid,
            failure=FAILURE_OF[done.cause],
            reason=done.reason,
            retry_later=done.cause in RETRY_LATER,
        )
    problems = header.uid_problems if header is not None else ()
    return PartOutcome(
        index,
        sop_class,
        sop_uid,
        study_uid,
        warning=DATA_SET_DOES_NOT_MATCH_SOP_CLASS if problems else None,
        reason="; ".join(problems) or None,
    )


def failed_part(
    index: int, head: bytes, failure: int, reason: str, retry_later: bool = False
) -> PartOutcome:
    """A part refused before the receive path saw it (wrong media type, too large,
    not buffered, an unexpected error), named as far as its first bytes tell."""
    sop_class, sop_uid, study_uid = identify(head)
    return PartOutcome(
        index, sop_class, sop_uid, study_uid, failure, reason=reason, retry_later=retry_later
    )


def http_status(outcomes: list[PartOutcome], malformed: bool) -> int:
    """PS3.18 Table 10.5.3-1 for the request's outcomes (see the module docstring)."""
    stored = [o for o in outcomes if o.stored]
    if stored:
        clean = len(stored) == len(outcomes) and not malformed
        return 200 if clean and not any(o.warning for o in stored) else 202
    if malformed:
        return 400
    if outcomes and all(o.retry_later for o in outcomes):
        return 503
    return 409


def response_dataset(outcomes: list[PartOutcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table I.1-1). Retrieve URL is type 2
    and left empty: the node serves no WADO-RS to retrieve from."""
    ds = Dataset()
    ds.RetrieveURL = None
    failed = [o for o in outcomes if not o.stored]
    stored = [o for o in outcomes if o.stored]
    if failed:
        ds.FailedSOPSequence = [_item(o) for o in failed]
    if stored:
        ds.ReferencedSOPSequence = [_item(o) for o in stored]
    return ds


def _item(outcome: PartOutcome) -> Dataset:
    item = Dataset()
    # SOP Instance Reference Macro (PS3.3 Table 10-11): empty where the part names none.
    item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
    item.ReferencedSOPInstanceUID = outcome.sop_uid or ""
    if outcome.failure is not None:
        item.FailureReason = outcome.failure
    else:
        item.RetrieveURL = None
        if outcome.warning is not None:
            item.WarningReason = outcome.warning
    return item


def render(ds: Dataset, media_type: str) -> bytes:
    """The response data set as DICOM JSON (PS3.18 F) or Native DICOM Model XML (PS3.19)."""
    if media_type == XML_TYPE:
        root = ElementTree.Element("NativeDicomModel", xmlns=NATIVE_DICOM)
        _xml_attributes(root, ds)
        return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return json.dumps(ds.to_json_dict(), separators=(",", ":")).encode()


def _xml_attributes(parent: ElementTree.Element, ds: Dataset) -> None:
    for elem in ds:
        attr = ElementTree.SubElement(
            parent,
            "DicomAttribute",
            tag=f"{int(elem.tag):08X}",
            vr=elem.VR,
            keyword=elem.keyword,
        )
        if elem.VR == "SQ":
            for number, item in enumerate(elem.value, 1):
                node = ElementTree.SubElement(attr, "Item", number=str(number))
                _xml_attributes(node, item)
            continue
        values = [] if elem.value in (None, "") else elem.value
        if not isinstance(values, list | tuple | MultiValue):
            values = [values]
        for number, value in enumerate(values, 1):
            ElementTree.SubElement(attr, "Value", number=str(number)).text = str(value)


def choose_media_type(accept: str | None) -> str | None:
    """The response media type for an Accept header: DICOM JSON unless the client
    prefers DICOM XML (quality values honoured); None when it accepts neither (406)."""
    if not accept:
        return JSON_TYPE
    ranked: list[tuple[float, int, str]] = []
    for position, entry in enumerate(accept.split(",")):
        fields = [f.strip() for f in entry.split(";")]
        media = fields[0].lower()
        quality = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        chosen = {
            JSON_TYPE: JSON_TYPE,
            "application/json": JSON_TYPE,
            XML_TYPE: XML_TYPE,
            "application/xml": XML_TYPE,
            "application/*": JSON_TYPE,
            "*/*": JSON_TYPE,
        }.get(media)
        if chosen is not None and quality > 0:
            ranked.append((-quality, position, chosen))
    return min(ranked)[2] if ranked else None


_UNSAFE = re.compile(r'[^\x20-\x7e]|"|\\')


def warning_headers(outcomes: list[PartOutcome], extra: list[str]) -> list[str]:
    """``Warning: 299`` values (RFC 7234 5.5) for failed and warned parts, then
    ``extra`` lines (a body that broke off), at most ``MAX_WARNINGS`` + a count."""
    texts = []
    for o in outcomes:
        code = o.failure if o.failure is not None else o.warning
        if code is None:
            continue
        reason = o.reason or "refused"
        named = o.sop_uid is None or o.sop_uid in reason
        what = f"part {o.index}" + ("" if named else f" (SOP Instance {o.sop_uid})")
        texts.append(f"{code:04X} {what}: {reason}")
    texts += extra
    if len(texts) > MAX_WARNINGS:
        texts = texts[:MAX_WARNINGS] + [f"and {len(texts) - MAX_WARNINGS} more"]
    return [f'299 dicom-node "{_UNSAFE.sub("?", t)[:500]}"' for t in texts]


def summary(outcomes: list[PartOutcome]) -> dict[str, Any]:
    """Counts and studies for the log and the audit trail (UIDs only)."""
    studies = sorted({o.study_uid for o in outcomes if o.stored and o.study_uid})
    return {
        "parts": len(outcomes),
        "stored": sum(o.stored for o in outcomes),
        "failed": sum(not o.stored for o in outcomes),
        "warned": sum(o.warning is not None for o in outcomes if o.stored),
        "study_uids": studies[:50],
    }
