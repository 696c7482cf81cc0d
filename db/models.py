"""The node's record of every step: studies, series, instances, jobs, results, dispatches.

Timestamps are timezone-aware UTC. States are plain strings (documented on each column)
so that SQLite and PostgreSQL behave the same and migrations stay simple.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores UTC; always returns aware datetimes (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


UID = String(64)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Why nothing ran (or other notes for the status page), e.g. a phase that never came.
    note: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    # receiving -> complete (-> receiving again when a late instance re-opens it)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
    routed_at: Mapped[datetime | None] = mapped_column()
    # Routing outcome: phase (A/P/D/N/unknown), confidence, reasons, matched rule.
    phase: Mapped[str | None] = mapped_column(String(8))
    phase_confidence: Mapped[float | None] = mapped_column(Float)
    phase_reasons: Mapped[list[Any] | None] = mapped_column()
    matched_rule: Mapped[str | None] = mapped_column(String(128))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance of a series (its file is in the spool).

    A SOP Instance UID is unique per series, not globally: some exporters reuse one UID
    in two series, and both are kept (the spool path includes the series).
    """

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("series_id", "sop_uid", name="uq_instances_series_sop"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # How often the same SOP instance was received (re-sends replace the file).
    receive_count: Mapped[int] = mapped_column(Integer, default=1)
    # Which image stack of its series the instance belongs to (orientation, size, pixel
    # spacing, image type; see inference.stacks), its position along the slice normal in
    # mm, and AcquisitionNumber: routing picks a series' main stack and checks it for gaps
    # without reading the files. NULL for rows from before migration 0004.
    stack_key: Mapped[str | None] = mapped_column(String(160))
    slice_position_mm: Mapped[float | None] = mapped_column(Float)
    acquisition_number: Mapped[int | None] = mapped_column(Integer)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One pipeline run on one study. state: see ``kernel.vocabulary.JobState``."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "queued_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    # {"<input name>": "<series uid>"}, e.g. {"image": "1.2.3"} or {"A": ..., "P": ...}
    inputs: Mapped[dict[str, Any]] = mapped_column()
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    not_before: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    # Free-form outcome for the status page: label volumes, dice, timings.
    summary: Mapped[dict[str, Any] | None] = mapped_column()
    # http(s) URLs told when the job ends (the pipeline's and the API request's
    # ``update_url``): a ``webhook_deliveries`` row each (migration 0009). NULL: none.
    update_urls: Mapped[list[Any] | None] = mapped_column()

    study: Mapped[Study] = relationship()


class Result(Base):
    """A DICOM object this node produced (a SEG, later RTSTRUCT)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # SEG
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    source_series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pipeline: Mapped[str | None] = mapped_column(String(64))
    result_type: Mapped[str | None] = mapped_column(String(16))  # BINARY, LABELMAP, RTSTRUCT
    # A later result of the same pipeline on the same series computed on other input (the
    # series grew, a slice was replaced): this one is no longer current.
    superseded_at: Mapped[datetime | None] = mapped_column()
    superseded_by: Mapped[str | None] = mapped_column(UID)  # the newer SOP Instance UID


class Dispatch(Base):
    """One (instance, destination) pair to deliver.

    state: see ``kernel.vocabulary.OutboxState``.
    """

    __tablename__ = "dispatches"
    __table_args__ = (
        UniqueConstraint("sop_uid", "destination", name="uq_dispatch_sop_destination"),
        Index("ix_dispatches_due", "state", "next_attempt_at"),
        Index("ix_dispatches_destination_attempt", "destination", "last_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # result | forward
    sop_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the row last became pending (creation or a resend): the outbox's max age counts
    # from here. NULL on rows written before migration 0003: created_at is used then.
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    # Storage commitment: the N-ACTION's Transaction UID, and when the destination
    # confirmed (state ``committed``).
    commit_uid: Mapped[str | None] = mapped_column(UID, index=True)
    committed_at: Mapped[datetime | None] = mapped_column()
    # When the dispatcher last tried to deliver it (destination health reads the recent
    # outcomes). NULL before the first attempt and on rows from before migration 0005.
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    # Review before sending (state ``held`` -> ``pending`` or ``rejected``): who decided,
    # when, and the reason given (required for a rejection).
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[datetime | None] = mapped_column()
    review_note: Mapped[str | None] = mapped_column(Text)
    # State ``sending``: which sender claimed the row (host, process, destination sender)
    # and when, written before its association opens. NULL otherwise (migration 0008).
    sending_since: Mapped[datetime | None] = mapped_column()
    sending_by: Mapped[str | None] = mapped_column(String(128))
    # Who decided how the last attempt ended (``kernel.vocabulary.SendCause``): the
    # destination answered, it did not, or this node failed itself. NULL before the first
    # attempt and on rows from before migration 0010.
    last_cause: Mapped[str | None] = mapped_column(String(16))
    # How many of ``attempts`` the destination did not answer (no association, refused
    # connection, timeout): those retry until ``dispatch.max_age_s``; ``max_attempts``
    # bounds only the others (migration 0011).
    unanswered: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class WebhookDelivery(Base):
    """One job status notification to one URL (a job's ``update_urls``): its exact JSON
    body, made in the transaction that ended the job, and its delivery.

    state: see ``kernel.webhooks.WebhookState`` (pending -> sending -> delivered, or
    pending again after a backoff, or failed with ``last_error``). Written only by
    ``kernel.webhooks``.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    # The job's state the body reports: done | failed | cancelled | expired.
    job_state: Mapped[str] = mapped_column(String(16))
    # The JSON body, byte for byte what is POSTed (UTF-8) and signed.
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    # The HTTP status of the last answer (NULL: none, e.g. a refused connection).
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column()
    # State ``sending``: which sender claimed the row and since when.
    sending_since: Mapped[datetime | None] = mapped_column()
    sending_by: Mapped[str | None] = mapped_column(String(128))


class DestinationEcho(Base):
    """One C-ECHO to a destination (periodic or asked for on the status page).

    Destination health is read from these and from the recent send outcomes; written only
    by ``dicom_node.health``, which keeps the last few days.
    """

    __tablename__ = "destination_echoes"
    __table_args__ = (Index("ix_destination_echoes_destination_at", "destination", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    # What went wrong (refused, rejected, timed out), or "success".
    detail: Mapped[str] = mapped_column(Text)
    round_trip_ms: Mapped[float | None] = mapped_column(Float)
    # periodic | manual (a user on the destinations page, named in ``requested_by``)
    trigger: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[str | None] = mapped_column(String(64))


class Event(Base):
    """The timeline: one row per step (received, complete, routed, queued, ...)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warning | error
    kind: Mapped[str] = mapped_column(String(32), index=True)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column()


class User(Base):
    """A person who may use the web pages and API. role: viewer, reviewer, operator or
    admin (``dicom_node.web.users.ROLES``). Written only by ``dicom_node.web.users``."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="viewer")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column()
    # Consecutive failed logins; at the limit the account is locked until locked_until.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column()
    # Disabled by an admin: no login, its tokens refused, its sessions ended. NULL: enabled.
    disabled_at: Mapped[datetime | None] = mapped_column()
    # When the password was last set (created, changed by the user, reset by an admin).
    # NULL on rows from before migration 0006.
    password_changed_at: Mapped[datetime | None] = mapped_column()
    # When an admin last lifted a lockout: login attempts before it no longer count.
    unlocked_at: Mapped[datetime | None] = mapped_column()


class ApiToken(Base):
    """A bearer token for the JSON API; only its SHA-256 is stored. Revoking deletes it
    (the audit log keeps who made and revoked it)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    # Who made it: an admin's username (web) or "cli:<OS user>@<host>". NULL before 0006.
    created_by: Mapped[str | None] = mapped_column(String(128))
    # After this the token is refused; NULL: it does not expire.
    expires_at: Mapped[datetime | None] = mapped_column()

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A browser login, kept on the server: the cookie holds a random id whose SHA-256 is
    stored here. Logout, a password change or reset, disabling or deleting the user
    delete the row, which ends the session at once. Written only by
    ``dicom_node.web.users``."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Last request that counted as activity (page refreshes by script do not).
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # created_at + web.session_max_age_s: the session ends then whatever the activity.
    expires_at: Mapped[datetime] = mapped_column()
    client_address: Mapped[str | None] = mapped_column(String(64))


class AuditRecord(Base):
    """The audit trail: who did or looked at what, when, from where, with what outcome.

    Append-only: the database refuses UPDATE and DELETE on this table (triggers of
    migration 0006). Written only by ``dicom_node.audit``. ``patient_name`` only when
    ``log_patient_names`` is on.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor_at", "actor", "at"),
        Index("ix_audit_log_action_at", "action", "at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # A username, a calling AE title, or "system".
    actor: Mapped[str] = mapped_column(String(128))
    # session | token | cli | dicom | system | anonymous (a failed login's claimed name)
    actor_kind: Mapped[str] = mapped_column(String(16))
    # The client's IP address, "<ip>:<port>" of a DICOM peer, or "cli:<OS user>@<host>".
    source: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(48))
    # success | failure | denied
    outcome: Mapped[str] = mapped_column(String(16))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(256))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    detail: Mapped[dict[str, Any] | None] = mapped_column()


class AuditForwarding(Base):
    """How far the audit trail has been forwarded (to the syslog collector): the last
    ``audit_log.id`` the collector accepted. Written only by ``dicom_node.audit``."""

    __tablename__ = "audit_forwarding"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RetrieveRequest(Base):
    """A study asked for from a configured source (C-MOVE / C-GET / WADO-RS), with its
    progress. Written only by ``dicom_node.retrieve``.

    state: see ``kernel.vocabulary.RetrieveState`` (requested -> querying -> retrieving ->
    received, or failed with ``reason``). The query is one of ``study_uid``,
    ``accession_number``, or ``patient_id`` with an optional ``date_from`` / ``date_to``;
    ``study_uid`` is filled in once the source named the study. ``pipelines``: the
    pipelines to run on it (null: the routing rules choose).
    """

    __tablename__ = "retrieve_requests"
    __table_args__ = (Index("ix_retrieve_requests_state_id", "state", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    date_from: Mapped[str | None] = mapped_column(String(8))  # YYYYMMDD
    date_to: Mapped[str | None] = mapped_column(String(8))
    pipelines: Mapped[list[Any] | None] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default="requested")
    # C-MOVE, C-GET or WADO-RS, once the retrieval started.
    method: Mapped[str | None] = mapped_column(String(16))
    # Why it failed (or what to know about it), in words naming the study and the source.
    reason: Mapped[str | None] = mapped_column(Text)
    # Instances the source said the study has (C-FIND / QIDO-RS, or the C-MOVE counts),
    # received by the node so far, and failed (sub-operations the source reported failed,
    # instances the node refused).
    instances_expected: Mapped[int | None] = mapped_column(Integer)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    # A username, or "cli:<OS user>@<host>".
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    # How often the node began it (a node stopped mid-retrieval begins it again).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # What the source answered (final status, series found), for the status page.
    detail: Mapped[dict[str, Any] | None] = mapped_column()
