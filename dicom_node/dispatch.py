"""The dispatcher: delivers due outbox rows by C-STORE (the outbox itself is ``kernel.outbox``).

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
- a retryable row fails when it was not delivered ``dispatch.max_age_s`` after it was
  queued, or after ``dispatch.max_attempts`` attempts.

A compressed object whose transfer syntax the destination refused is sent decompressed
(lossless, same SOP Instance UID). With ``storage_commitment`` the batch's successes are
sent an N-ACTION on the same association (see ``dicom_node.commitment``).

A destination with ``tls`` is sent to over DICOM TLS (``dicom_node.tls``); a failed TLS
connection is "no answer" (retried) and its reason, naming the destination's address and
the problem (e.g. "TLS with 10.0.0.2:2762 failed: certificate verify failed: certificate
has expired"), is the row's error, which the destinations page shows.
"""

from __future__ import annotations

import logging
import threading

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
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
from kernel import outbox
from kernel.outbox import SendOutcome
from kernel.settings import Destination, DispatchSettings

log = logging.getLogger("dicom_node.dispatch")

OUT_OF_RESOURCES_MASK, OUT_OF_RESOURCES = 0xFF00, 0xA700


def classify_status(status: int | None) -> SendOutcome:
    """The outbox verdict for one C-STORE response status (None: no response)."""
    if status is None:
        return SendOutcome("retry", None, "no response (association lost or timed out)")
    category = code_to_category(status)
    if category == STATUS_SUCCESS:
        return SendOutcome("sent", status, "success")
    if category == STATUS_WARNING:
        return SendOutcome("sent", status, f"warning 0x{status:04X}")
    if category == STATUS_FAILURE and status & OUT_OF_RESOURCES_MASK == OUT_OF_RESOURCES:
        return SendOutcome("retry", status, f"out of resources 0x{status:04X}")
    return SendOutcome("failed", status, f"refused 0x{status:04X}")


class Dispatcher:
    """The outbox loop: claims due rows, sends them per destination, records outcomes.

    ``destinations``: name -> Destination; ``calling_ae``: our AE title unless a
    destination sets ``calling_ae_title``. ``wake`` lets other stages ask for a poll now.
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
        self.wake = threading.Event()
        for name, dest in destinations.items():  # unusable TLS files stop the start
            tls.client_tls_args(dest.tls, dest.host, f"destinations.{name}.tls")

    def reset_interrupted(self) -> None:
        """Rows left ``sending`` by a stopped node are simply pending again."""
        outbox.reset_interrupted(self.db)

    def run_forever(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                sent = self.poll()
            except Exception:
                log.exception("dispatch loop error")
                sent = 0
            if not sent:
                self.wake.wait(interval_s)
                self.wake.clear()

    def poll(self) -> int:
        """Send everything that is due; returns the number of rows attempted."""
        batches: dict[str, list[Dispatch]] = {}
        for row in outbox.claim_due(self.db, self.batch_size):
            batches.setdefault(row.destination, []).append(row)
        for name, batch in batches.items():
            self._send_batch(name, batch)
        return sum(len(b) for b in batches.values())

    def backoff_s(self, attempts: int) -> float:
        """The delay after the ``attempts``-th failed send (policy of ``kernel.outbox``)."""
        return outbox.send_policy(self.settings).delay_s(attempts)

    def _send_batch(self, name: str, batch: list[Dispatch]) -> None:
        dest = self.destinations.get(name)
        if dest is None:
            outcomes = {
                r.id: SendOutcome("failed", None, f"destination {name!r} unknown") for r in batch
            }
            outbox.record_outcomes(self.db, batch, outcomes, self.settings)
            return
        outcomes: dict[int, SendOutcome] = {}
        recorded = False
        datasets = {}
        for row in batch:
            try:
                datasets[row.id] = pydicom.dcmread(row.path)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                outcomes[row.id] = SendOutcome("failed", None, f"file unreadable: {exc}")
        ae = AE(ae_title=dest.calling_ae_title or self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        contexts = {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets.values()
        }
        for sop_class, tsuid in sorted(contexts):
            syntaxes = list(dict.fromkeys([tsuid, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
            ae.add_requested_context(sop_class, syntaxes)
        handlers = []
        if dest.storage_commitment:
            ae.add_requested_context(StorageCommitmentPushModel)
            handlers = [(evt.EVT_N_EVENT_REPORT, event_report_handler(self.db))]
        assoc = None
        tls_args, why = None, None
        if datasets:
            try:
                tls_args = tls.client_tls_args(dest.tls, dest.host, f"destinations.{name}.tls")
                assoc = ae.associate(
                    dest.host,
                    dest.port,
                    ae_title=dest.ae_title,
                    evt_handlers=handlers,
                    tls_args=tls_args,
                )
            except tls.TlsSetupError as exc:  # our own certificate or CA file
                why = str(exc)
            except Exception as exc:  # socket errors surface here on some platforms
                log.warning("association to %s failed: %s", name, exc)
        if datasets and (assoc is None or not assoc.is_established):
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
            for row_id in datasets:
                outcomes[row_id] = SendOutcome("retry", None, why)
        elif assoc is not None:
            try:
                for row in batch:
                    ds = datasets.get(row.id)
                    if ds is None:
                        continue
                    if not assoc.is_established:
                        outcomes[row.id] = SendOutcome("retry", None, "association lost")
                        continue
                    try:
                        ds = _fit_to_accepted(assoc, ds)
                        rsp = assoc.send_c_store(ds)
                        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                        outcomes[row.id] = classify_status(status)
                    except ValueError as exc:  # no accepted presentation context
                        outcomes[row.id] = SendOutcome("failed", None, f"not accepted: {exc}")
                if dest.storage_commitment and assoc.is_established:
                    stored = [
                        (row.sop_class_uid, row.sop_uid)
                        for row in batch
                        if row.id in outcomes and outcomes[row.id].state == "sent"
                    ]
                    transaction = new_transaction_uid()
                    outbox.record_outcomes(self.db, batch, outcomes, self.settings, transaction)
                    recorded = True
                    request_commitment(assoc, stored, transaction)
            finally:
                if assoc.is_established:
                    assoc.release()
        if not recorded:
            outbox.record_outcomes(self.db, batch, outcomes, self.settings)


def _fit_to_accepted(assoc, ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset as sent: as stored when the destination accepted its transfer syntax,
    else decompressed to an uncompressed syntax it accepted (the only conversion we make:
    lossless, and every storage SCP must take uncompressed data)."""
    sop_class = str(ds.SOPClassUID)
    stored = str(ds.file_meta.TransferSyntaxUID)
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class
    }
    if not accepted or stored in accepted or not ds.file_meta.TransferSyntaxUID.is_compressed:
        return ds  # pynetdicom reports a missing context itself
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if target in accepted:
            log.info(
                "%s %s: destination refused %s, sending decompressed as %s",
                sop_class, ds.SOPInstanceUID, stored, target,
            )  # fmt: skip
            ds.decompress(generate_instance_uid=False)  # lossless: same instance
            if target != ExplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = target
            return ds
    return ds
