"""The node's vocabulary: every state and kind it stores, named once.

The database keeps these as plain strings (the same on SQLite and PostgreSQL); the enums
are ``StrEnum`` so a member *is* its string and compares equal to what a row holds.
"""

from __future__ import annotations

from enum import StrEnum


class SeriesState(StrEnum):
    """Where a received series stands (``series.state``), moved by ``dicom_node.records``.

    RECEIVING: instances are arriving, or a late instance re-opened a complete series.
    COMPLETE: its associations were released and it was quiet for ``quiet_period_s``;
    the router classifies and routes it once per completion.
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    """A pipeline run (``jobs.state``), moved only by ``inference.queue``.

    QUEUED -> RUNNING -> DONE, or back to QUEUED (retry with backoff, lease expired, node
    stopped) until FAILED. CANCELLING is a running job asked to stop; it ends CANCELLED.
    EXPIRED: waited longer than ``worker.max_queue_age_s`` and was never started.
    """

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# Jobs that still hold a place in the queue or a worker.
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)
# Jobs a worker holds.
RUNNING_JOB_STATES = (JobState.RUNNING, JobState.CANCELLING)
# Jobs that ended; a user may queue them again.
FINISHED_JOB_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED)


class OutboxState(StrEnum):
    """One (instance, destination) delivery (``dispatches.state``), moved by ``kernel.outbox``.

    PENDING -> SENDING -> SENT (-> COMMITTED when the destination confirms storage
    commitment), or back to PENDING with backoff after a retryable failure, or FAILED
    (refused for good, attempts or age used up). SUPERSEDED: a result replaced by a newer
    one before it was delivered; it is not sent. A resend makes any row but a HELD or
    REJECTED one PENDING again.

    Review before sending (``review: required`` on the pipeline or the destination): a
    result's rows start HELD instead of PENDING and are never sent while held; a
    reviewer's approval makes them PENDING (sent at once), a rejection REJECTED (never
    sent; who, when and why are on the row and in the event log).
    """

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    COMMITTED = "committed"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    HELD = "held"
    REJECTED = "rejected"


# Rows that still wait for delivery.
UNDELIVERED_STATES = (OutboxState.PENDING, OutboxState.SENDING)
# Rows that reached their destination.
DELIVERED_STATES = (OutboxState.SENT, OutboxState.COMMITTED)
# Rows only a reviewer may release (a resend leaves them alone).
REVIEW_STATES = (OutboxState.HELD, OutboxState.REJECTED)


class DestinationState(StrEnum):
    """How a destination is doing, judged by ``dicom_node.health`` from what actually
    happened: the latest send attempts and C-ECHOs (periodic and asked for).

    OK: the latest send or C-ECHO got an answer. UNREACHABLE: the latest one got none
    (association refused, rejected or timed out). BACKLOG: it answers, but results wait
    longer than ``health.pending_alert_s``. UNKNOWN: nothing sent or echoed yet.
    """

    OK = "ok"
    UNREACHABLE = "unreachable"
    BACKLOG = "backlog"
    UNKNOWN = "unknown"


class RetrieveState(StrEnum):
    """Where a retrieve request (``retrieve_requests.state``) stands; moved only by
    ``dicom_node.retrieve``.

    REQUESTED: waits for the node's retrieval loop. QUERYING: the source is asked which
    study it is (C-FIND / QIDO-RS). RETRIEVING: instances are coming (C-MOVE, C-GET,
    WADO-RS). RECEIVED: the source finished and every instance it sent was stored; routing
    takes it from there. FAILED: with the reason (unknown study, refused move, source
    unreachable, instances that failed).
    """

    REQUESTED = "requested"
    QUERYING = "querying"
    RETRIEVING = "retrieving"
    RECEIVED = "received"
    FAILED = "failed"


ACTIVE_RETRIEVE_STATES = (
    RetrieveState.REQUESTED,
    RetrieveState.QUERYING,
    RetrieveState.RETRIEVING,
)


class SendCause(StrEnum):
    """Who decided how one delivery attempt ended (``dispatches.last_cause``).

    DESTINATION: it answered (stored, refused, out of resources); NO_ANSWER: it did not
    (no association, connection refused, timed out, association lost); NODE: this node
    failed itself (an unreadable file, a conversion it could not make): that says
    nothing about the destination's health.
    """

    DESTINATION = "destination"
    NO_ANSWER = "no answer"
    NODE = "node"


class OutboxKind(StrEnum):
    """What an outbox row carries: a RESULT the node made, or a FORWARDed original."""

    RESULT = "result"
    FORWARD = "forward"


class ResultType(StrEnum):
    """How a destination wants a segmentation (``destinations[].result_type``)."""

    BINARY = "BINARY"  # DICOM-SEG, one bit per pixel: every viewer reads it
    LABELMAP = "LABELMAP"  # Label Map Segmentation (RLE): small, needs a recent viewer
    RTSTRUCT = "RTSTRUCT"  # RT Structure Set contours, for systems without SEG
    # The class probabilities as a FRACTIONAL SEG: made when a pipeline asks for it
    # (``probabilities: [fractional_seg]``), never a destination's own result_type.
    FRACTIONAL = "FRACTIONAL"


class Phase(StrEnum):
    """CT contrast phase of a series (``series.phase``)."""

    ARTERIAL = "A"
    PORTAL_VENOUS = "P"
    DELAYED = "D"
    NON_CONTRAST = "N"
    UNKNOWN = "unknown"


PHASE_NAMES = {
    Phase.ARTERIAL: "arterial",
    Phase.PORTAL_VENOUS: "portal venous",
    Phase.DELAYED: "delayed",
    Phase.NON_CONTRAST: "non-contrast",
}


class Priority(StrEnum):
    """Job priority: URGENT jobs are claimed before NORMAL ones."""

    NORMAL = "normal"
    URGENT = "urgent"

    @property
    def rank(self) -> int:
        """The number stored in ``jobs.priority``: higher runs first."""
        return PRIORITY_RANKS[self]


PRIORITY_RANKS = {Priority.NORMAL: 0, Priority.URGENT: 10}


class EventLevel(StrEnum):
    """Severity of an event: ERROR events show on the dashboard's error list."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(StrEnum):
    """What happened (``events.kind``); the event log (``kernel.events``) writes them.

    Receive and completeness: STUDY_RECEIVED (first instance of a study), SERIES_COMPLETE,
    SERIES_REOPENED (a late instance), UID_NOT_CONFORMANT (a UID accepted although it
    breaks PS3.5 9.1), DUPLICATE_SOP_UID (a SOP Instance UID already seen in another
    series: both kept), SERIES_UID_CONFLICT (a series UID already used by another study:
    refused). Routing: CLASSIFIED (phase and reasons), ROUTED (rules that matched),
    STACKS_LEFT_OUT (images of a series that are not its main stack), SERIES_INCOMPLETE
    (headers suggest missing slices: its pipelines wait for the study to settle),
    PHASE_CHANGED, PIPELINE_NOT_RUN (an input never came), STUDY_SETTLED, ROUTING_ERROR.
    Jobs: JOB_QUEUED, JOB_STARTED, JOB_DONE, JOB_RETRY (``data.requeued_by`` when a user
    queued it again: a new run), JOB_FAILED, JOB_REQUEUED (node stopped), JOB_EXPIRED,
    JOB_CANCEL, JOB_PRIORITY.
    Results: RESULT_WRITTEN, RESULT_EMPTY, RESULT_SUPERSEDED (a newer result of the same
    pipeline on the same series, computed on other input, replaces it). Review: RESULT_HELD
    (waits for a reviewer), RESULT_APPROVED, RESULT_REJECTED (who, when, why). Outbox:
    SENT, SEND_RETRY, SEND_FAILED, RESEND, COMMITTED, COMMIT_FAILED. Destinations:
    DESTINATION_DOWN (sends or the periodic C-ECHO stopped getting answers),
    DESTINATION_UP (it answers again). Rules file: RULES_RELOADED, RULES_RELOAD_FAILED.
    Retrieval: RETRIEVE_STARTED (a source sends a study asked for), RETRIEVE_RECEIVED,
    RETRIEVE_FAILED (with the reason). Job status webhooks: WEBHOOK_SENT, WEBHOOK_RETRY,
    WEBHOOK_FAILED (``kernel.webhooks``; the URL's host only).
    """

    STUDY_RECEIVED = "study_received"
    SERIES_COMPLETE = "series_complete"
    SERIES_REOPENED = "series_reopened"
    UID_NOT_CONFORMANT = "uid_not_conformant"
    DUPLICATE_SOP_UID = "duplicate_sop_uid"
    SERIES_UID_CONFLICT = "series_uid_conflict"
    CLASSIFIED = "classified"
    ROUTED = "routed"
    STACKS_LEFT_OUT = "stacks_left_out"
    SERIES_INCOMPLETE = "series_incomplete"
    PHASE_CHANGED = "phase_changed"
    PIPELINE_NOT_RUN = "pipeline_not_run"
    STUDY_SETTLED = "study_settled"
    ROUTING_ERROR = "routing_error"
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    JOB_DONE = "job_done"
    JOB_RETRY = "job_retry"
    JOB_FAILED = "job_failed"
    JOB_REQUEUED = "job_requeued"
    JOB_EXPIRED = "job_expired"
    JOB_CANCEL = "job_cancel"
    JOB_PRIORITY = "job_priority"
    RESULT_WRITTEN = "result_written"
    RESULT_EMPTY = "result_empty"
    # A result's text written as ISO_IR 192: the source's character set could not carry it.
    RESULT_TRANSCODED = "result_transcoded"
    RESULT_SUPERSEDED = "result_superseded"
    RESULT_HELD = "result_held"
    RESULT_APPROVED = "result_approved"
    RESULT_REJECTED = "result_rejected"
    SENT = "sent"
    SEND_RETRY = "send_retry"
    SEND_FAILED = "send_failed"
    RESEND = "resend"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    DESTINATION_DOWN = "destination_down"
    DESTINATION_UP = "destination_up"
    RULES_RELOADED = "rules_reloaded"
    RULES_RELOAD_FAILED = "rules_reload_failed"
    RETRIEVE_STARTED = "retrieve_started"
    RETRIEVE_RECEIVED = "retrieve_received"
    RETRIEVE_FAILED = "retrieve_failed"
    WEBHOOK_SENT = "webhook_sent"
    WEBHOOK_RETRY = "webhook_retry"
    WEBHOOK_FAILED = "webhook_failed"


class DeliveryStatus(StrEnum):
    """What a study, and each pipeline or forward in it, has come to: the one status
    vocabulary of the pages, the JSON API and the metrics. Derived from the rows by
    ``dicom_node.status`` (never stored), each with the reason shown next to it.

    RECEIVING: instances still arrive, or a complete series is not routed yet.
    NO_RULE_MATCHED: no rule matched any series (why: each rule's first failing condition).
    NO_ACTION: rules matched but asked for no pipeline and no forward (e.g. discard).
    WAITING: a pipeline waits for inputs (which) until the study settles.
    NOT_RUN: the study settled and a pipeline's input never came (which).
    QUEUED, RUNNING: the pipeline's job waits for or holds a worker.
    HELD: the result waits for a reviewer (``review: required``).
    DELIVERY_PENDING: a result or forward waits to be delivered (why: the destination is
    unreachable, or it is on its way).
    DELIVERED: every result reached every destination. DELIVERED_NO_FINDING: the
    pipeline found nothing and a "no finding" object was delivered. NOT_SENT: nothing to
    send (empty result with ``empty_result: skip``, or no destination).
    PARTIALLY_DELIVERED: some results or destinations got through, others did not.
    FAILED: a job or a delivery failed for good (why). CANCELLED: a user cancelled the
    job (or it expired unstarted). REJECTED: a reviewer rejected the result (why).
    """

    RECEIVING = "receiving"
    NO_RULE_MATCHED = "no_rule_matched"
    NO_ACTION = "no_action"
    WAITING = "waiting_for_inputs"
    NOT_RUN = "not_run"
    QUEUED = "queued"
    RUNNING = "running"
    HELD = "held_for_review"
    DELIVERY_PENDING = "delivery_pending"
    DELIVERED = "delivered"
    DELIVERED_NO_FINDING = "delivered_no_finding"
    NOT_SENT = "not_sent"
    PARTIALLY_DELIVERED = "partially_delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
