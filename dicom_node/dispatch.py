"""The dispatcher: delivers due outbox rows by C-STORE (the outbox itself is ``kernel.outbox``).

DICOMweb destinations (``kind: dicomweb``) get STOW-RS senders instead
(``dicom_node.dispatch_dicomweb``), with the same claim and record discipline.

One association per destination batch. Contract: how each answer of a destination is
handled (PS3.4 B.2.3 Storage Service Class statuses, PS3.7 C.1.3 categories, read with
pynetdicom's ``code_to_category``):

- ``0x0000`` Success -> ``sent``;
- Warning ``0xB000`` coercion, ``0xB006`` element discarded, ``0xB007`` dataset does not
  match the SOP class, any ``0xBxxx`` -> ``sent`` (the destination kept the object; the
  status is stored on the row);
- ``0xA7xx`` Refused: Out of Resources -> retry with capped exponential backoff and
  jitter (``dispatch.retry_initial_s`` .. ``retry_max_s``);
- no answer: association refused, rejected, aborted or timed out (``dispatch.timeout_s``)
  -> retry the same way;
- ``0xA9xx`` dataset does not match SOP class, ``0xCxxx`` cannot understand, any other
  failure status, a SOP class or transfer syntax the destination did not accept, or a file
  that cannot be read -> ``failed`` at once: a resend cannot change the answer;
- an error of this node while it prepares a send (a file it cannot decompress or encode
  for what the destination accepted) -> ``failed`` at once, "could not convert for the
  destination: ...", cause ``node`` (destination health does not count it against the
  destination, which did answer);
- a retryable row fails when it was not delivered ``dispatch.max_age_s`` after it was
  queued; "no answer" is retried until then (a PACS down for hours of maintenance), while
  ``dispatch.max_attempts`` bounds the refusals the destination answered (``0xA7xx``).

A compressed object whose transfer syntax the destination refused is sent decompressed
(lossless, same SOP Instance UID) and encoded in the uncompressed transfer syntax it
accepted: Explicit VR Little Endian, else Implicit VR Little Endian, which every SCP
must accept (PS3.5 10.1). With ``storage_commitment`` the batch's successes are
sent an N-ACTION on the same association (see ``dicom_node.commitment``).

A destination with ``tls`` is sent to over DICOM TLS (``dicom_node.tls``); a failed TLS
connection is "no answer" (retried) and its reason, naming the destination's address and
the problem (e.g. "TLS with 10.0.0.2:2762 failed: certificate verify failed: certificate
has expired"), is the row's error, which the destinations page shows.

Senders: every destination has its own ``max_associations`` sender threads, so a
destination that is down, slow, or accepts an association and then never answers (until
``dispatch.timeout_s``) holds up only its own rows. A sender claims a few due rows at a
time (``SENDER_CHUNK``; ``outbox.claim_due`` writes ``sending``, the sender and the time
before the association opens), keeps one association open while rows keep coming, and
records each C-STORE's outcome as it is answered. A node killed in the middle of a batch
therefore sends again, at its next start, only the row whose answer it had not recorded
(it may have arrived) and rows it had not tried yet. Files are sent as stored, read from
disk as they are written to the socket by the sender thread itself
(``dicom_node.store_send``: pynetdicom's own C-STORE cost ~3 ms more per instance),
unless the destination refused their transfer syntax (then decompressed, as above, and
sent with pynetdicom's ``send_c_store``) or the association is TLS (pynetdicom's
``send_c_store`` of the file: its DUL thread alone uses the SSL object).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from db.models import Dispatch
from db.session import Database
from dicom_node import tls
from dicom_node.commitment import (
    event_report_handler,
    new_transaction_uid,
    request_commitment,
)
from dicom_node.dispatch_dicomweb import DicomwebSender
from dicom_node.sender import Sender
from dicom_node.store_send import (
    FileStore,
    NotStorable,
    data_set_offset,
    keep_answers_for_the_caller,
)
from kernel import outbox
from kernel.outbox import SendOutcome
from kernel.settings import Destination, DispatchSettings
from kernel.vocabulary import SendCause

log = logging.getLogger("dicom_node.dispatch")

OUT_OF_RESOURCES_MASK, OUT_OF_RESOURCES = 0xFF00, 0xA700

# send_c_store(path) (a file without a preamble, which store_send does not take) streams
# the stored file instead of decoding and re-encoding it. Only calls that pass a path are
# affected (the others here pass a Dataset, which they need decoded anyway).
_config.STORE_SEND_CHUNKED_DATASET = True


def classify_status(status: int | None, error_comment: str | None = None) -> SendOutcome:
    """The outbox verdict for one C-STORE response status (None: no response); the
    destination's Error Comment (0000,0902), if it gave one, ends the reason."""
    outcome = _verdict(status)
    if error_comment and outcome.status is not None and outcome.status != 0x0000:
        return SendOutcome(
            outcome.state, outcome.status, f"{outcome.detail}: {error_comment}", outcome.cause
        )
    return outcome


def _verdict(status: int | None) -> SendOutcome:
    if status is None:
        return SendOutcome(
            "retry", None, "no response (association lost or timed out)", SendCause.NO_ANSWER
        )
    category = code_to_category(status)
    answered = SendCause.DESTINATION
    if category == STATUS_SUCCESS:
        return SendOutcome("sent", status, "success", answered)
    if category == STATUS_WARNING:
        return SendOutcome("sent", status, f"warning 0x{status:04X}", answered)
    if category == STATUS_FAILURE and status & OUT_OF_RESOURCES_MASK == OUT_OF_RESOURCES:
        return SendOutcome("retry", status, f"out of resources 0x{status:04X}", answered)
    return SendOutcome("failed", status, f"refused 0x{status:04X}", answered)


class _Wake:
    """``Dispatcher.wake``: ``set()`` (new rows, a destination answers again) wakes the
    dispatcher loop and every sender."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._senders: list[threading.Event] = []

    def set(self) -> None:
        self._event.set()
        for event in list(self._senders):
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def add(self, event: threading.Event) -> None:
        self._senders.append(event)


class Dispatcher:
    """The outbox: per destination, sender threads that claim due rows and send them
    (module docstring); ``poll`` does the same once, in the calling thread.

    ``destinations``: name -> Destination; ``calling_ae``: our AE title unless a
    destination sets ``calling_ae_title``. ``wake`` lets other stages ask for a look now.
    """

    def __init__(
        self,
        db: Database,
        destinations: dict[str, Destination],
        settings: DispatchSettings,
        calling_ae: str,
        batch_size: int = 200,
    ) -> None:
        self.db = db
        self.destinations = destinations
        self.settings = settings
        self.calling_ae = calling_ae
        self.batch_size = batch_size
        self.wake = _Wake()
        self.name = f"{socket.gethostname()}/{os.getpid()}"
        for name, dest in destinations.items():  # unusable TLS files stop the start
            tls.client_tls_args(dest.tls, dest.host, f"destinations.{name}.tls")

    def reset_interrupted(self) -> None:
        """Rows left ``sending`` by a stopped node are pending again (``outbox``)."""
        count = outbox.reset_interrupted(self.db)
        if count:
            log.warning("%d sends interrupted by the last stop go again", count)

    def run_forever(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Start every destination's senders, then fail rows no destination takes, until
        ``stop``; returns when the senders have finished their current C-STORE."""
        threads = []
        for dest in self.destinations.values():
            for slot in range(dest.max_associations):
                sender = self.sender(dest, slot)
                self.wake.add(sender.wake)
                thread = threading.Thread(
                    target=sender.run_forever,
                    args=(stop, interval_s),
                    name=f"send-{dest.name}-{slot}",
                    daemon=True,
                )
                thread.start()
                threads.append(thread)
        while not stop.is_set():
            try:
                self._fail_unknown()
            except Exception:
                log.exception("dispatch loop error")
            self.wake.wait(interval_s)
            self.wake.clear()
        self.wake.set()  # the senders see ``stop`` now
        for thread in threads:
            thread.join(timeout=self.settings.timeout_s + 5)

    def poll(self) -> int:
        """Send everything that is due now, in this thread (one association per
        destination); returns the number of rows attempted."""
        count = self._fail_unknown()
        for dest in self.destinations.values():
            count += self.sender(dest, 0).send_due()
        return count

    def sender(self, dest: Destination, slot: int) -> DestinationSender | DicomwebSender:
        """The sender of ``dest``'s kind: C-STORE (``dimse``) or STOW-RS (``dicomweb``,
        ``dicom_node.dispatch_dicomweb``)."""
        if dest.kind == "dicomweb":
            return DicomwebSender(self, dest, slot)
        return DestinationSender(self, dest, slot)

    def backoff_s(self, attempts: int) -> float:
        """The delay after the ``attempts``-th failed send (policy of ``kernel.outbox``)."""
        return outbox.send_policy(self.settings).delay_s(attempts)

    def _fail_unknown(self) -> int:
        """Rows for a destination the settings no longer name fail at once."""
        rows = outbox.claim_due(
            self.db, self.batch_size, sender=self.name, destinations_not=list(self.destinations)
        )
        if rows:
            outbox.record_outcomes(
                self.db,
                rows,
                {
                    r.id: SendOutcome(
                        "failed", None, f"destination {r.destination!r} unknown", SendCause.NODE
                    )
                    for r in rows
                },
                self.settings,
            )
        return len(rows)


# Rows a sender claims at a time on its association: small, so that the destination's
# senders share a burst evenly and a stop leaves few claimed rows.
SENDER_CHUNK = 20


@dataclass
class _Prepared:
    """A claimed row, ready to go: its file's SOP class, SOP instance and transfer
    syntax (File Meta Information)."""

    row: Dispatch
    sop_class: str
    sop_instance: str
    transfer_syntax: str


class DestinationSender(Sender):
    """Sends one destination's due rows, on one association at a time (``slot`` of its
    ``max_associations``). Outcomes are recorded row by row as the answers come."""

    def __init__(self, dispatcher: Dispatcher, dest: Destination, slot: int) -> None:
        super().__init__(dispatcher, dest, slot)
        self.dispatcher = dispatcher

    def send_due(self, stop: threading.Event | None = None) -> int:
        """Send this destination's due rows until none is left; returns how many were
        attempted (each row at most once per call)."""
        tried: set[int] = set()
        assoc = None
        accepted: set[tuple[str, str]] = set()
        rows: list[Dispatch] = []
        try:
            while stop is None or not stop.is_set():
                rows = self._claim(tried)
                if not rows:
                    break
                tried.update(r.id for r in rows)
                # What the rows carry, for their events, read once per chunk (the cache
                # holds only this chunk: it does not grow with the rows a sender sends).
                self._carried = outbox.carried_many(self.db, rows)
                prepared = self._prepare(rows)
                if not prepared:
                    continue
                wanted = {(p.sop_class, p.transfer_syntax) for p in prepared}
                if assoc is not None and not (assoc.is_established and wanted <= accepted):
                    assoc.release() if assoc.is_established else None
                    assoc = None
                if assoc is None:
                    assoc, why, cause = self._associate(wanted)
                    if assoc is None:
                        outcomes = {
                            p.row.id: SendOutcome("retry", None, why, cause) for p in prepared
                        }
                        self._record([p.row for p in prepared], outcomes)
                        break  # the destination does not answer: its backoff decides
                    accepted = wanted
                    # It answers: rows waiting out a backoff because it did not go now
                    # (this sender claims them next), not at the next C-ECHO.
                    if outbox.due_now(self.db, self.dest.name, unanswered_only=True):
                        self.dispatcher.wake.set()
                self._send(assoc, prepared, stop)
        except Exception as exc:
            # Rows of the chunk whose outcome was not recorded go again after a backoff
            # (not at the next start): the error is their reason.
            outbox.retry_claimed(self.db, rows, f"sender error: {exc!r}", self.settings)
            raise
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
        return len(tried)

    def _claim(self, tried: set[int]) -> list[Dispatch]:
        return outbox.claim_due(
            self.db, SENDER_CHUNK, destination=self.dest.name, sender=self.name, exclude=tried
        )

    def _prepare(self, rows: list[Dispatch]) -> list[_Prepared]:
        """Each row's SOP class and transfer syntax from its file's meta information; a
        row whose file cannot be read fails at once."""
        prepared, failed = [], {}
        for row in rows:
            try:
                meta = read_file_meta_info(row.path)
                prepared.append(
                    _Prepared(
                        row,
                        str(meta.MediaStorageSOPClassUID),
                        str(meta.MediaStorageSOPInstanceUID),
                        str(meta.TransferSyntaxUID),
                    )
                )
            except (OSError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
                failed[row.id] = SendOutcome(
                    "failed", None, f"file unreadable: {exc}", SendCause.NODE
                )
        if failed:
            self._record([r for r in rows if r.id in failed], failed)
        return prepared

    def _associate(self, wanted: set[tuple[str, str]]) -> tuple[Any, str, SendCause]:
        """An association with contexts for ``wanted`` (SOP class, transfer syntax), or
        (None, why not, whose fault: no answer, or our own TLS files)."""
        dest, name = self.dest, self.dest.name
        ae = AE(ae_title=dest.calling_ae_title or self.dispatcher.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for sop_class, tsuid in sorted(wanted):
            syntaxes = list(dict.fromkeys([tsuid, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
            ae.add_requested_context(sop_class, syntaxes)
        handlers = [(evt.EVT_CONN_OPEN, _no_delay)]
        if dest.storage_commitment:
            ae.add_requested_context(StorageCommitmentPushModel)
            handlers.append((evt.EVT_N_EVENT_REPORT, event_report_handler(self.db)))
        assoc, tls_args, why, cause = None, None, None, SendCause.NO_ANSWER
        try:
            tls_args = tls.client_tls_args(dest.tls, dest.host, f"destinations.{name}.tls")
            assoc = ae.associate(
                dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers,
                tls_args=tls_args,
            )  # fmt: skip
        except tls.TlsSetupError as exc:  # our own certificate or CA file
            why, cause = str(exc), SendCause.NODE
        except Exception as exc:  # socket errors surface here on some platforms
            log.warning("association to %s failed: %s", name, exc)
        if assoc is not None and assoc.is_established:
            if tls_args is None:
                assoc.file_store = FileStore(assoc, self.settings.timeout_s)
                assoc.file_store.install()
            else:
                # Over TLS the sender does not write to the socket itself: pynetdicom's
                # reader thread reads the same SSL object, which OpenSSL does not allow
                # from two threads at once; pynetdicom's DUL thread does both.
                assoc.file_store = None
                keep_answers_for_the_caller(assoc)
                # pynetdicom leaves the connected socket without a timeout: a destination
                # that stops reading would block its DUL thread in a write for ever.
                with contextlib.suppress(OSError, AttributeError):
                    assoc.dul.socket.socket.settimeout(self.settings.timeout_s)
            return assoc, "", SendCause.DESTINATION
        why = (
            why
            or tls.association_failure(tls_args, dest.host, dest.port)
            or (
                "association rejected"
                if assoc is not None and assoc.is_rejected
                else "association refused or aborted (destination down?)"
            )
        )
        if tls_args is not None or dest.tls is not None:
            log.warning("sending to %s: %s", name, why)
        return None, why, cause

    def _send(self, assoc: Any, prepared: list[_Prepared], stop: threading.Event | None) -> None:
        """C-STORE each row, recording its outcome as soon as it is answered; with
        storage commitment, then ask the destination to commit what it took."""
        transaction = new_transaction_uid() if self.dest.storage_commitment else None
        stored: list[tuple[str, str]] = []
        for index, item in enumerate(prepared):
            row = item.row
            if stop is not None and stop.is_set():
                outbox.release_unsent(self.db, [p.row for p in prepared[index:]])
                break
            if not assoc.is_established:  # aborted or timed out on an earlier row
                outbox.release_unsent(self.db, [p.row for p in prepared[index:]])
                break  # not tried: pending again, no attempt counted; a new association
            outcome = self._store(assoc, item)
            self._record([row], {row.id: outcome}, transaction)
            if outcome.state == "sent":
                stored.append((row.sop_class_uid, row.sop_uid))
        if transaction is not None and stored and assoc.is_established:
            request_commitment(assoc, stored, transaction)

    def _store(self, assoc: Any, item: _Prepared) -> SendOutcome:
        """One C-STORE: the file as stored when its transfer syntax was accepted (read
        from disk as it is written, ``dicom_node.store_send``), else converted
        (``_fit_to_accepted``); a conversion this node cannot make fails the row at once,
        as its own error."""
        context_id = _accepted_context(assoc, item.sop_class, item.transfer_syntax)
        try:
            if context_id is not None and assoc.file_store is not None:
                with contextlib.suppress(NotStorable):
                    offset = data_set_offset(item.row.path)
                    answer = assoc.file_store.store(
                        item.row.path, offset, context_id, item.sop_class, item.sop_instance
                    )
                    if answer is None:
                        return classify_status(None)
                    return classify_status(answer.status, answer.error_comment)
                rsp = assoc.send_c_store(Path(item.row.path))  # no File Meta: pynetdicom's way
            elif context_id is not None:  # over TLS
                rsp = assoc.send_c_store(Path(item.row.path))
            else:
                ds = _fit_to_accepted(assoc, pydicom.dcmread(item.row.path))
                rsp = assoc.send_c_store(ds)
        except ConversionError as exc:
            return SendOutcome(
                "failed", None, f"could not convert for the destination: {exc}", SendCause.NODE
            )
        except ValueError as exc:  # no accepted presentation context
            return SendOutcome("failed", None, f"not accepted: {exc}", SendCause.DESTINATION)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            return SendOutcome("failed", None, f"file unreadable: {exc}", SendCause.NODE)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        comment = str(rsp.ErrorComment) if rsp is not None and "ErrorComment" in rsp else None
        return classify_status(status, comment)

    def _record(
        self,
        rows: list[Dispatch],
        outcomes: dict[int, SendOutcome],
        transaction: str | None = None,
    ) -> None:
        outbox.record_outcomes(
            self.db, rows, outcomes, self.settings, transaction, cache=self._carried
        )


def _accepted_context(assoc: Any, sop_class: str, transfer_syntax: str) -> int | None:
    """The ID of the accepted presentation context for ``sop_class`` whose transfer
    syntax is ``transfer_syntax``, or None."""
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) == sop_class and str(cx.transfer_syntax[0]) == transfer_syntax:
            return int(cx.context_id)
    return None


def _no_delay(event: evt.Event) -> None:
    """TCP_NODELAY on the association's socket as soon as it is connected (before the
    A-ASSOCIATE-RQ). pynetdicom leaves Nagle's algorithm on, and writes each PDU in one
    ``send``: on a socket with unacknowledged data every P-DATA-TF shorter than a segment
    then waits for the receiver's (often delayed) ACK, which made each C-STORE of a
    0.5 MB instance to Orthanc ~15 ms slower than storescu's (DCMTK sets it with
    TCP_NODELAY=1)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ConversionError(Exception):
    """This node could not convert an object for what the destination accepted (a
    decompression or an encoding that failed): its own error, not the destination's."""


def _fit_to_accepted(assoc: Any, ds: pydicom.Dataset) -> pydicom.Dataset:
    """The data set as sent: as read when the destination accepted its transfer syntax
    or it is not compressed (pynetdicom converts between uncompressed syntaxes itself),
    else decompressed and re-encoded for an uncompressed syntax the destination accepted
    for its SOP class, Explicit VR Little Endian first (keeps the VRs), else Implicit VR
    Little Endian (PS3.5 10.1: every SCP accepts it). Lossless, same SOP Instance UID.

    pynetdicom sends a data set in its file meta's transfer syntax and refuses one whose
    encoding (``original_encoding``) says otherwise, so both are set to the target here,
    and the data set is encoded once for it to find what cannot be (e.g. a value too long
    for its VR's length field). Raises ``ConversionError`` (decompression or encoding
    failed); with no accepted context the data set is returned as it is and
    ``send_c_store`` says so."""
    sop_class = str(ds.SOPClassUID)
    stored = ds.file_meta.TransferSyntaxUID
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class
    }
    if not accepted or stored in accepted or not stored.is_compressed:
        return ds
    target = next((ts for ts in _UNCOMPRESSED if ts in accepted), None)
    if target is None:
        return ds  # only other compressed syntaxes: send_c_store reports no context
    log.info(
        "%s %s: destination refused %s, sending decompressed as %s",
        sop_class, ds.SOPInstanceUID, stored.name, target.name,
    )  # fmt: skip
    try:
        ds.decompress(generate_instance_uid=False)  # lossless: same instance
        ds.file_meta.TransferSyntaxUID = target
        ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian)
        encoded = DicomBytesIO()
        encoded.is_implicit_VR, encoded.is_little_endian = target.is_implicit_VR, True
        write_dataset(encoded, ds)
    except Exception as exc:  # a codec's or pydicom's error: the reason is the message
        raise ConversionError(
            f"{stored.name} -> {target.name} of {ds.SOPInstanceUID}: {type(exc).__name__}: {exc}"
        ) from exc
    return ds


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
