"""Storage Commitment Push Model (PS3.4 annex J): turning "sent" into "committed".

After a batch is stored, the dispatcher asks the destination, on the same association,
to commit the instances it accepted (N-ACTION, action type 1, one Transaction UID per
batch). The destination answers later with an N-EVENT-REPORT carrying the same
Transaction UID: usually on a new association to our listener (Orthanc does this, so the
destination must be one of our ``peers``), sometimes on the still-open one. Both paths end
in ``record_report``: listed instances become ``committed``; instances the destination
says it failed to keep go back to ``pending`` and are sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel
from pynetdicom.status import Status

from db.session import Database
from kernel import outbox

log = logging.getLogger("dicom_node.commitment")

# The well-known SOP Instance of the Storage Commitment Push Model SOP Class.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ACTION_REQUEST_COMMIT = 1
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2
# General statuses of DIMSE-N services (PS3.7 annex C) that pynetdicom's Status does not
# name, registered with its own mechanism.
Status.add("PROCESSING_FAILURE", 0x0110)
Status.add("NO_SUCH_SOP_INSTANCE", 0x0112)


def new_transaction_uid() -> str:
    return generate_uid()


def request_commitment(
    assoc: Association, instances: Iterable[tuple[str, str]], transaction_uid: str
) -> bool:
    """N-ACTION asking to commit ``(sop_class_uid, sop_instance_uid)`` pairs.

    The caller records ``transaction_uid`` on the rows first: the report can arrive on
    another association before this call returns. Returns whether the destination
    accepted the request (if not, the rows stay ``sent``: delivered, not confirmed).
    """
    request = Dataset()
    request.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_uid in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    if not items:
        return False
    request.ReferencedSOPSequence = items
    try:
        status, _ = assoc.send_n_action(
            request,
            ACTION_REQUEST_COMMIT,
            StorageCommitmentPushModel,
            STORAGE_COMMITMENT_INSTANCE,
        )
    except (RuntimeError, ValueError) as exc:  # no accepted context, association gone
        log.warning("storage commitment request not sent: %s", exc)
        return False
    code = int(status.Status) if status is not None and "Status" in status else None
    if code != Status.SUCCESS:
        log.warning("storage commitment request refused (status %s)", code)
        return False
    return True


def record_report(db: Database, event_type: int, report: Dataset) -> int:
    """Apply an N-EVENT-REPORT to the outbox; returns how many rows it settled."""
    transaction = str(report.get("TransactionUID", ""))
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])}
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", Status.PROCESSING_FAILURE))
        for i in report.get("FailedSOPSequence", [])
    }
    if not outbox.transaction_known(db, transaction):
        log.warning("storage commitment report for unknown transaction %s", transaction)
        return 0
    settled = outbox.record_commitment(db, transaction, committed, failed)
    log.info(
        "storage commitment %s (event type %d): %d committed, %d failed",
        transaction, event_type, len(committed), len(failed),
    )  # fmt: skip
    return settled


def event_report_handler(db: Database):
    """A pynetdicom EVT_N_EVENT_REPORT handler bound to ``db``: (status, reply).

    Answers ``0x0000`` Success once the report is recorded, ``0x0112`` No Such SOP
    Instance for a report of any other SOP class, ``0x0110`` Processing Failure when the
    database could not record it (the destination may send it again).
    """

    def on_event_report(event: evt.Event) -> tuple[int, None]:
        request = event.request
        if str(request.AffectedSOPClassUID) != StorageCommitmentPushModel:
            return Status.NO_SUCH_SOP_INSTANCE, None  # we only take commitment reports
        try:
            record_report(db, int(request.EventTypeID), event.event_information)
        except Exception:
            log.exception("storage commitment report could not be recorded")
            return Status.PROCESSING_FAILURE, None
        return Status.SUCCESS, None

    return on_event_report
