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
    one before it was delivered; it is not sent. A resend makes any row PENDING again.
    """

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    COMMITTED = "committed"
    FAILED = "failed"
    SUPERSEDED = "superseded"


# Rows that still wait for delivery.
UNDELIVERED_STATES = (OutboxState.PENDING, OutboxState.SENDING)


class OutboxKind(StrEnum):
    """What an outbox row carries: a RESULT the node made, or a FORWARDed original."""

    RESULT = "result"
    FORWARD = "forward"


class ResultType(StrEnum):
    """How a destination wants a segmentation (``destinations[].result_type``)."""

    BINARY = "BINARY"  # DICOM-SEG, one bit per pixel: every viewer reads it
    LABELMAP = "LABELMAP"  # Label Map Segmentation (RLE): small, needs a recent viewer
    RTSTRUCT = "RTSTRUCT"  # RT Structure Set contours, for systems without SEG


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
    PHASE_CHANGED, PIPELINE_NOT_RUN (an input never came), STUDY_SETTLED, ROUTING_ERROR. Jobs: JOB_QUEUED, JOB_STARTED, JOB_DONE, JOB_RETRY,
    JOB_FAILED, JOB_REQUEUED (node stopped), JOB_EXPIRED, JOB_CANCEL, JOB_PRIORITY.
    Results: RESULT_WRITTEN, RESULT_EMPTY, RESULT_SUPERSEDED (a newer result of the same
    pipeline on the same series, computed on other input, replaces it). Outbox: SENT, SEND_RETRY, SEND_FAILED, RESEND,
    COMMITTED, COMMIT_FAILED. Rules file: RULES_RELOADED, RULES_RELOAD_FAILED.
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
    SENT = "sent"
    SEND_RETRY = "send_retry"
    SEND_FAILED = "send_failed"
    RESEND = "resend"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    RULES_RELOADED = "rules_reloaded"
    RULES_RELOAD_FAILED = "rules_reload_failed"
