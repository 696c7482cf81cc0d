"""The outbox: delivers pending (instance, destination) rows by C-STORE.

One association per destination batch. Outcomes are classified per instance:
success and warnings (0xBxxx) are ``sent``; out-of-resources (0xA7xx), refused or
broken associations retry with capped exponential backoff and jitter; errors that a
resend will not change (0xA9xx, 0xCxxx, unknown SOP class) are ``failed`` at once.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select

from db.models import Dispatch, Study, utcnow
from db.session import Database
from dicom_node.commitment import (
    event_report_handler,
    new_transaction_uid,
    request_commitment,
)
from dicom_node.config import Destination, DispatchSettings
from dicom_node.records import add_event

log = logging.getLogger("dicom_node.dispatch")


@dataclass(frozen=True)
class SendOutcome:
    state: str  # sent | retry | failed
    status: int | None
    detail: str


def classify_status(status: int | None) -> SendOutcome:
    if status is None:
        return SendOutcome("retry", None, "no response (association lost or timed out)")
    if status == 0x0000:
        return SendOutcome("sent", status, "success")
    if status & 0xF000 == 0xB000:
        return SendOutcome("sent", status, f"warning 0x{status:04X}")
    if status & 0xFF00 == 0xA700:
        return SendOutcome("retry", status, f"out of resources 0x{status:04X}")
    return SendOutcome("failed", status, f"refused 0x{status:04X}")


class Dispatcher:
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

    def reset_interrupted(self) -> None:
        """Rows left ``sending`` by a stopped node are simply pending again."""
        with self.db.session() as s:
            for row in s.scalars(select(Dispatch).where(Dispatch.state == "sending")):
                row.state = "pending"

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
        now = utcnow()
        with self.db.session() as s:
            rows = s.scalars(
                select(Dispatch)
                .where(Dispatch.state == "pending", Dispatch.next_attempt_at <= now)
                .order_by(Dispatch.next_attempt_at, Dispatch.id)
                .limit(self.batch_size)
            ).all()
            for row in rows:
                row.state = "sending"
            batches: dict[str, list[Dispatch]] = defaultdict(list)
            for row in rows:
                s.expunge(row)
                batches[row.destination].append(row)
        for name, batch in batches.items():
            self._send_batch(name, batch)
        return sum(len(b) for b in batches.values())

    def _send_batch(self, name: str, batch: list[Dispatch]) -> None:
        dest = self.destinations.get(name)
        if dest is None:
            outcomes = {
                r.id: SendOutcome("failed", None, f"destination {name!r} unknown") for r in batch
            }
            self._record(batch, outcomes)
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
        if datasets:
            try:
                assoc = ae.associate(
                    dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers
                )
            except Exception as exc:  # socket errors surface here on some platforms
                log.warning("association to %s failed: %s", name, exc)
        if datasets and (assoc is None or not assoc.is_established):
            why = (
                "association rejected"
                if assoc is not None and assoc.is_rejected
                else ("association refused or aborted (destination down?)")
            )
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
                    self._record(batch, outcomes, transaction)
                    recorded = True
                    request_commitment(assoc, stored, transaction)
            finally:
                if assoc.is_established:
                    assoc.release()
        if not recorded:
            self._record(batch, outcomes)

    def _record(
        self,
        batch: list[Dispatch],
        outcomes: dict[int, SendOutcome],
        commit_uid: str | None = None,
    ) -> None:
        now = utcnow()
        with self.db.session() as s:
            for detached in batch:
                row = s.get_one(Dispatch, detached.id)
                out = outcomes[row.id]
                row.attempts += 1
                row.last_status = out.status
                row.last_error = None if out.state == "sent" else out.detail
                study_uid = s.get(Study, row.study_id).study_uid if row.study_id else None
                if out.state == "sent":
                    row.state, row.sent_at, row.commit_uid = "sent", now, commit_uid
                    add_event(
                        s,
                        "sent",
                        f"{row.kind} {row.sop_uid} sent to {row.destination} ({out.detail})",
                        study_uid=study_uid,
                    )
                elif out.state == "retry" and self._too_old(row, now):
                    row.state = "failed"
                    row.last_error = (
                        f"{out.detail}; not delivered within max_age_s="
                        f"{self.settings.max_age_s:g} s of being queued"
                    )
                    add_event(
                        s,
                        "send_failed",
                        f"{row.kind} {row.sop_uid} to {row.destination} failed: {row.last_error}",
                        level="error",
                        study_uid=study_uid,
                    )
                elif out.state == "retry" and row.attempts < self.settings.max_attempts:
                    row.state = "pending"
                    delay = self.backoff_s(row.attempts)
                    row.next_attempt_at = now + timedelta(seconds=delay)
                    add_event(
                        s,
                        "send_retry",
                        f"{row.kind} {row.sop_uid} to {row.destination}: {out.detail}; "
                        f"attempt {row.attempts}, next in {delay:.1f} s",
                        level="warning",
                        study_uid=study_uid,
                    )
                else:
                    row.state = "failed"
                    add_event(
                        s,
                        "send_failed",
                        f"{row.kind} {row.sop_uid} to {row.destination} failed after "
                        f"{row.attempts} attempts: {out.detail}",
                        level="error",
                        study_uid=study_uid,
                    )

    def _too_old(self, row: Dispatch, now: datetime) -> bool:
        queued = row.queued_at or row.created_at
        return (now - queued).total_seconds() >= self.settings.max_age_s

    def backoff_s(self, attempts: int) -> float:
        base = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** (attempts - 1))
        return base * random.uniform(0.5, 1.0)  # jitter spreads retries of many rows


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


def resend(db: Database, dispatch_ids: list[int], by: str = "admin") -> int:
    """Queue chosen outbox rows again (any state but ``sending``); returns how many."""
    now = utcnow()
    count = 0
    with db.session() as s:
        for row in s.scalars(select(Dispatch).where(Dispatch.id.in_(dispatch_ids))):
            if row.state == "sending":
                continue
            row.state, row.attempts, row.next_attempt_at, row.last_error = "pending", 0, now, None
            row.queued_at = now
            count += 1
            study_uid = s.get(Study, row.study_id).study_uid if row.study_id else None
            add_event(
                s,
                "resend",
                f"{row.kind} {row.sop_uid} to {row.destination} re-queued by {by}",
                study_uid=study_uid,
            )
    return count
