"""Delivers a DICOMweb destination's outbox rows by STOW-RS (PS3.18 10.5).

The same discipline as the DIMSE senders (``dicom_node.dispatch``): each of the
destination's ``max_associations`` senders claims a few due rows (``outbox.claim_due``
writes ``sending``, the sender and the time first), posts them in ONE request to
``{url}/studies`` and records every row's outcome from the answer
(``outbox.record_outcomes``). The request body is the stored files as they are, streamed
from disk in ``BLOCK_BYTES`` pieces with a known Content-Length: nothing is decoded and
memory stays bounded whatever the instances weigh.

How each answer is handled, like the DIMSE statuses:

- connection refused, name not resolved, TLS failure, no answer within
  ``dispatch.timeout_s`` -> every row of the request ``retry`` with the outbox's capped
  exponential backoff (``dispatch.retry_initial_s`` .. ``retry_max_s``), cause
  ``SendCause.NO_ANSWER``: retried until ``max_age_s`` like a DIMSE destination down;
- HTTP 5xx, 408 or 429 -> every row ``retry`` the same way, cause
  ``SendCause.DESTINATION`` (it answered): failed after ``max_attempts``;
- HTTP 200 / 202 / 409 with a Store Instances Response (PS3.18 10.5.3, DICOM JSON or
  XML, read by ``dicom_node.stow_answer``): row by row, an instance in
  ReferencedSOPSequence is ``sent`` (its WarningReason kept as the status), one in
  FailedSOPSequence is judged by its FailureReason like a C-STORE status (``0xA7xx`` out
  of resources: ``retry``; any other: ``failed`` at once, the reason recorded); an
  instance the answer does not list is ``retry`` ("HTTP 200 but instance ... is not in
  ReferencedSOPSequence"): only a listed instance counts as stored;
- HTTP 200 / 202 / 409 without a readable Store Instances Response (an empty body, an
  HTML page, ``{}``) -> every row ``retry`` with what the answer was instead ("HTTP 200
  but the answer is not a Store Instances Response (text/html)"), then ``failed`` by the
  outbox's ``max_attempts`` / ``max_age_s`` like any retry;
- an answer larger than ``ANSWER_MAX_BYTES`` (16 MiB) or not complete within
  ``dispatch.timeout_s`` -> every row ``retry`` ("HTTP 200 but the answer is too large
  ..."): the answer is read with a cap (``dicomweb_http.read_capped``), never whole;
  the body of any other status is not read at all;
- any other 4xx (400, 401, 403, 404, 413, 415 ...) or an unexpected status -> every row
  ``failed`` at once with the status and its meaning: resending cannot change it;
- a file that cannot be read -> that row ``failed`` before the request (cause
  ``SendCause.NODE``: nothing about the destination's health).

Every outcome the destination answered over HTTP has cause ``SendCause.DESTINATION``
even without a DICOM status: health words it "latest send refused: HTTP 401 ...", not
"no answer".

Why not ``DICOMwebClient.store_instances``: it takes decoded data sets, re-encodes each
one and builds the whole request in memory, and raises on a 409 without its
FailedSOPSequence. The request goes through the same ``requests`` session conventions as
dicomweb-client's (``dicom_node.dicomweb_http``).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
import requests
from pydicom.filereader import read_file_meta_info
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from db.models import Dispatch
from dicom_node.dicomweb_http import (
    AnswerUnread,
    http_status_text,
    read_capped,
    request_error_text,
    session,
)
from dicom_node.sender import Sender, SenderHost
from dicom_node.stow_answer import NotAStoreResponse, parse_store_answer
from kernel import outbox
from kernel.outbox import SendOutcome
from kernel.settings import Destination
from kernel.vocabulary import SendCause

log = logging.getLogger("dicom_node.dispatch_dicomweb")

# Rows per STOW-RS request: as many as a DIMSE sender claims at a time.
STOW_CHUNK = 20
# Bytes read from a file and handed to the socket at a time.
BLOCK_BYTES = 1 << 20
# At most this much of a STOW-RS answer is read (20 instances answer a few KiB).
ANSWER_MAX_BYTES = 16 << 20
# HTTP statuses whose answer is read (a Store Instances Response); others are not.
READ = (200, 202, 409)

PROCESSING_FAILURE = 0x0110
# Failure Reasons a STOW-RS origin server answers (PS3.18 10.5.3, PS3.4 B.2.3).
FAILURE_MEANING = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
# Who decided an outcome the destination answered over HTTP: a refusal (401), an error
# (503) or an answer that is no Store Instances Response. Health words it "refused".
ANSWERED = SendCause.DESTINATION
AGAIN = "sent again: another file of its request changed"
# HTTP statuses that a later attempt may not get (besides every 5xx).
RETRY_HTTP = {408, 429}


class FileChanged(ValueError):
    """A file no longer has the size it had when the request was framed. Not an
    ``OSError``: the HTTP stack must let it through rather than call it a network error."""

    def __init__(self, row_id: int, message: str) -> None:
        super().__init__(message)
        self.row_id = row_id


@dataclass(frozen=True)
class _Part:
    row: Dispatch
    size: int


class StowBody:
    """A ``multipart/related; type="application/dicom"`` body (PS3.18 8.6.1.2) read from
    files as it is sent: ``len()`` is its exact size (sent as Content-Length), iterating
    yields the framing and ``BLOCK_BYTES`` pieces of each file."""

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts
        self.boundary = f"dicom-node-{uuid.uuid4().hex}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._end = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        framing = len(self._head) + 2  # each part ends with CRLF before the next boundary
        return sum(p.size + framing for p in self.parts) + len(self._end)

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            yield self._head
            left = part.size
            with open(part.row.path, "rb") as f:
                while left > 0:
                    block = f.read(min(BLOCK_BYTES, left))
                    if not block:
                        break
                    left -= len(block)
                    yield block
                if left or f.read(1):
                    raise FileChanged(part.row.id, f"file {part.row.path} changed while sent")
            yield b"\r\n"
        yield self._end


def classify_reason(code: int | None, http: int) -> SendOutcome:
    """The outbox verdict for one instance's WarningReason / FailureReason (a DICOM
    status code) in a Store Instances Response answered with HTTP ``http``."""
    if code is None or code_to_category(code) == STATUS_SUCCESS:
        return SendOutcome("sent", 0, f"stored (HTTP {http})", ANSWERED)
    meaning = FAILURE_MEANING.get(code, "")
    named = f"0x{code:04X}" + (f" {meaning}" if meaning else "")
    category = code_to_category(code)
    if category == STATUS_WARNING:
        return SendOutcome("sent", code, f"stored with warning {named} (HTTP {http})", ANSWERED)
    if category == STATUS_FAILURE and code & 0xFF00 == 0xA700:
        return SendOutcome("retry", code, f"STOW-RS FailureReason {named} (HTTP {http})", ANSWERED)
    why = f"refused by STOW-RS: FailureReason {named} (HTTP {http})"
    return SendOutcome("failed", code, why, ANSWERED)


def outcomes_of(
    code: int, reason: str | None, content_type: str | None, body: bytes, rows: list[Dispatch]
) -> dict[int, SendOutcome]:
    """Every row's outcome from one STOW-RS answer: HTTP status ``code`` (``reason``
    phrase), its Content-Type and ``body`` (module docstring)."""
    status = http_status_text(code, reason)
    if code >= 500 or code in RETRY_HTTP:
        return {r.id: SendOutcome("retry", None, status, ANSWERED) for r in rows}
    if code not in READ:
        if 300 <= code < 400:
            status += " (a redirect: set url to the address it names)"
        return {r.id: SendOutcome("failed", None, status, ANSWERED) for r in rows}
    try:
        answer = parse_store_answer(body, content_type)
    except NotAStoreResponse as exc:
        why = f"HTTP {code} but the answer is not a Store Instances Response ({exc})"
        return {r.id: SendOutcome("retry", None, why, ANSWERED) for r in rows}
    out = {}
    for r in rows:
        if r.sop_uid in answer.failed:
            failure = answer.failed[r.sop_uid]
            out[r.id] = classify_reason(PROCESSING_FAILURE if failure is None else failure, code)
        elif r.sop_uid in answer.referenced:
            out[r.id] = classify_reason(answer.referenced[r.sop_uid], code)
        else:
            why = f"HTTP {code} but instance {r.sop_uid} is not in ReferencedSOPSequence"
            out[r.id] = SendOutcome("retry", None, why, ANSWERED)
    return out


class DicomwebSender(Sender):
    """Sends one DICOMweb destination's due rows, one STOW-RS request per claimed chunk
    (``slot`` of its ``max_associations``). The interface of ``DestinationSender``:
    ``wake``, ``run_forever``, ``send_due``."""

    def __init__(self, host: SenderHost, dest: Destination, slot: int) -> None:
        super().__init__(host, dest, slot)
        self.url = f"{dest.url}/studies"
        self._session: requests.Session | None = None

    def close(self) -> None:
        """Close the HTTP connections (kept open between the requests of one
        ``send_due``, like a DIMSE sender's association)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def send_due(self, stop: threading.Event | None = None) -> int:
        """Send this destination's due rows until none is left or it does not answer;
        returns how many were attempted (each row at most once per call)."""
        try:
            return self._send_due(stop)
        finally:
            self.close()

    def _send_due(self, stop: threading.Event | None) -> int:
        tried: set[int] = set()
        while stop is None or not stop.is_set():
            rows = outbox.claim_due(
                self.db, STOW_CHUNK, destination=self.dest.name, sender=self.name, exclude=tried
            )
            if not rows:
                break
            tried.update(r.id for r in rows)
            self._carried = {}  # what rows carry, for their events: this chunk's only
            parts = self._prepare(rows)
            if not parts:
                continue
            if stop is not None and stop.is_set():
                outbox.release_unsent(self.db, [p.row for p in parts])
                break
            outcomes = self._post(parts)
            self._record([p.row for p in parts], outcomes)
            if all(o.state == "retry" and o.status is None for o in outcomes.values()):
                break  # no answer, or a busy server: its backoff decides
            if any(o.cause == SendCause.DESTINATION for o in outcomes.values()):
                # It answers: rows waiting out a backoff because it did not go now.
                outbox.due_now(self.db, self.dest.name, unanswered_only=True)
        return len(tried)

    def _prepare(self, rows: list[Dispatch]) -> list[_Part]:
        """Each row's file size; a row whose file is missing or not DICOM fails at once."""
        parts, failed = [], {}
        for row in rows:
            try:
                read_file_meta_info(row.path)  # a Part 10 file, as STOW-RS wants
                parts.append(_Part(row, os.stat(row.path).st_size))
            except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
                failed[row.id] = SendOutcome(
                    "failed", None, f"file unreadable: {exc}", SendCause.NODE
                )
        if failed:
            self._record([r for r in rows if r.id in failed], failed)
        return parts

    def _post(self, parts: list[_Part]) -> dict[int, SendOutcome]:
        """One STOW-RS request carrying ``parts``; every row's outcome."""
        rows = [p.row for p in parts]
        body = StowBody(parts)
        if self._session is None:
            self._session = session(self.dest.auth, self.dest.ca_bundle)
        timeout = self.settings.timeout_s
        try:
            response = self._session.post(
                self.url,
                data=body,
                headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"},
                timeout=(timeout, timeout),
                allow_redirects=False,
                stream=True,  # the answer is read below, with a cap
            )
        except FileChanged as exc:
            self.close()  # the connection carried a cut-off body
            return {
                r.id: SendOutcome("failed", None, str(exc), SendCause.NODE)
                if r.id == exc.row_id
                else SendOutcome("retry", None, AGAIN, SendCause.NODE)
                for r in rows
            }
        except requests.RequestException as exc:
            self.close()
            why = request_error_text(exc, self.url, timeout)
            log.warning("STOW-RS to %s: %s", self.dest.name, why)
            return {r.id: SendOutcome("retry", None, why, SendCause.NO_ANSWER) for r in rows}
        code = response.status_code
        with response:
            try:
                answer = read_capped(response, ANSWER_MAX_BYTES, timeout) if code in READ else b""
            except AnswerUnread as exc:
                self.close()  # the rest of the answer is not read: the connection goes
                why = f"HTTP {code} but {exc}"
                log.warning("STOW-RS of %d instances to %s: %s", len(rows), self.dest.name, why)
                return {r.id: SendOutcome("retry", None, why, ANSWERED) for r in rows}
            outcomes = outcomes_of(
                code, response.reason, response.headers.get("Content-Type"), answer, rows
            )
        unsure = [o.detail for o in outcomes.values() if o.state == "retry" and o.status is None]
        if code not in (200, 202) or unsure:
            log.warning(
                "STOW-RS of %d instances to %s: %s",
                len(rows), self.dest.name,
                unsure[0] if unsure else http_status_text(code, response.reason),
            )  # fmt: skip
        return outcomes

    def _record(self, rows: list[Dispatch], outcomes: dict[int, SendOutcome]) -> None:
        outbox.record_outcomes(self.db, rows, outcomes, self.settings, cache=self._carried)
