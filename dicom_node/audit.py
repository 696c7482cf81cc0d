"""The audit trail: the one writer of the ``audit_log`` table (and its forwarding cursor).

Who did or looked at what, when, from where, with which outcome: logins and failed
logins, views of studies and results, preview and slice downloads, every action on jobs,
sends and results, user and token changes, node starts (with a digest of the settings in
force), rules reloads, and DICOM associations. The table is append-only (the database's
own triggers refuse UPDATE and DELETE, migration 0006).

One record is one row::

    at, actor, actor_kind, source, action, outcome, object_type, object_id,
    study_uid, patient_id, patient_name, detail

``patient_id`` is filled from the study when a record names one; ``patient_name`` only
when ``log_patient_names`` is on. The node's log gets one line per record with the UIDs
only. Exported as JSON lines (``export_lines``) and, with ``audit.syslog``, forwarded to a
collector as RFC 5424 messages (``SyslogForwarder``).

The DICOM listener calls ``association(db, facts)`` when an association closes.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditForwarding, AuditRecord, Dispatch, Job, Result, Study, utcnow
from db.session import Database
from kernel.settings import SyslogSettings

log = logging.getLogger("dicom_node.audit")


class Action(StrEnum):
    """What an audit record is about (at most 32 characters: the syslog MSGID)."""

    LOGIN = "login"
    LOGOUT = "logout"
    REQUEST_DENIED = "request_denied"
    STUDY_VIEWED = "study_viewed"
    STUDIES_SEARCHED = "studies_searched"
    RESULT_VIEWED = "result_viewed"
    PREVIEW_DOWNLOADED = "preview_downloaded"
    SLICES_VIEWED = "result_slices_viewed"
    DRY_RUN = "rules_dry_run"
    RESULT_APPROVED = "result_approved"
    RESULT_REJECTED = "result_rejected"
    JOB_RETRIED = "job_retried"
    JOB_CANCELLED = "job_cancelled"
    JOB_PRIORITY = "job_priority_changed"
    SENDS_RESENT = "sends_resent"
    DESTINATION_ECHOED = "destination_echoed"
    PATH_JOB_QUEUED = "path_job_queued"
    USER_CREATED = "user_created"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    USER_DELETED = "user_deleted"
    USER_UNLOCKED = "user_unlocked"
    USER_ROLE_CHANGED = "user_role_changed"
    PASSWORD_RESET = "password_reset"
    PASSWORD_CHANGED = "password_changed"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    AUDIT_EXPORTED = "audit_exported"
    SETTINGS_VIEWED = "settings_viewed"
    NODE_STARTED = "node_started"
    RULES_RELOADED = "rules_reloaded"
    DICOM_ASSOCIATION = "dicom_association"
    SOURCE_SEARCHED = "source_searched"
    RETRIEVE_REQUESTED = "retrieve_requested"
    STOW_RECEIVED = "stow_received"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # asked for and could not be done (wrong password, conflict)
    DENIED = "denied"  # refused: the role does not allow it, a peer not admitted


@dataclass(frozen=True)
class Actor:
    """Who acts: ``name`` (username, AE title or "system"), ``kind`` (session, token,
    cli, dicom, system, anonymous) and ``source`` (client address, "cli:user@host")."""

    name: str
    kind: str
    source: str | None = None


SYSTEM = Actor("system", "system", None)


def cli_actor() -> Actor:
    """The OS user running a ``dicom-node`` command on this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Actor(f"cli:{user}", "cli", f"cli:{user}@{socket.gethostname()}")


def _clip(value: str | None, size: int) -> str | None:
    return None if value is None else str(value)[:size]


def _subject(s: Session, study_uid: str | None) -> tuple[str | None, str | None]:
    if not study_uid:
        return None, None
    row = s.execute(
        select(Study.patient_id, Study.patient_name).where(Study.study_uid == study_uid)
    ).first()
    return (row[0], row[1]) if row else (None, None)


def record(
    db: Database,
    action: Action | str,
    actor: Actor,
    *,
    outcome: Outcome | str = Outcome.SUCCESS,
    object_type: str | None = None,
    object_id: str | int | None = None,
    study_uid: str | None = None,
    detail: dict[str, Any] | None = None,
    patient_names: bool = False,
    patient_id: str | None = None,
) -> None:
    """Append one audit record in its own transaction and log it (UIDs only).

    ``study_uid`` names the study the record is about; its patient ID (and, with
    ``patient_names`` = the ``log_patient_names`` setting, the patient name) is copied
    from the studies table. ``patient_id`` names the patient where no study row does (a
    source searched by patient ID). Raises ``ValueError`` for an action or outcome outside the
    vocabulary; database errors propagate (an action that cannot be audited fails).
    """
    action, outcome = Action(action), Outcome(outcome)
    with db.session() as s:
        study_patient_id, patient_name = _subject(s, study_uid)
        patient_id = study_patient_id or patient_id
        s.add(
            AuditRecord(
                at=utcnow(),
                actor=_clip(actor.name, 128),
                actor_kind=actor.kind,
                source=_clip(actor.source, 128),
                action=str(action),
                outcome=str(outcome),
                object_type=object_type,
                object_id=_clip(None if object_id is None else str(object_id), 256),
                study_uid=study_uid,
                patient_id=patient_id,
                patient_name=patient_name if patient_names else None,
                detail=detail,
            )
        )
    log.info(
        "audit %s %s by %s (%s) from %s: %s%s",
        action,
        outcome,
        actor.name,
        actor.kind,
        actor.source or "-",
        f"{object_type} {object_id}" if object_type else "-",
        f" study={study_uid}" if study_uid else "",
    )


# -- lookups for callers that know an object, not its study ------------------------------


def study_of_result(db: Database, result_id: int) -> str | None:
    """The Study Instance UID of a result, None when the result does not exist."""
    with db.session() as s:
        return s.scalar(
            select(Study.study_uid)
            .join(Result, Result.study_id == Study.id)
            .where(Result.id == result_id)
        )


def study_of_job(db: Database, job_id: int) -> str | None:
    with db.session() as s:
        return s.scalar(
            select(Study.study_uid).join(Job, Job.study_id == Study.id).where(Job.id == job_id)
        )


def studies_of_dispatches(db: Database, ids: list[int]) -> dict[str | None, list[int]]:
    """Study UID -> the given dispatch ids of that study (None: rows without a study)."""
    grouped: dict[str | None, list[int]] = {}
    if not ids:
        return grouped
    with db.session() as s:
        rows = s.execute(
            select(Dispatch.id, Study.study_uid)
            .outerjoin(Study, Dispatch.study_id == Study.id)
            .where(Dispatch.id.in_(ids))
        ).all()
    for dispatch_id, study_uid in rows:
        grouped.setdefault(study_uid, []).append(dispatch_id)
    return grouped


# -- DICOM associations -------------------------------------------------------------------


class AssociationLike(Protocol):
    """What the listener knows of an association when it closes
    (``dicom_node.scp.AssociationFacts``)."""

    peer_address: str
    peer_port: int
    calling_ae: str
    called_ae: str
    transport: str  # "plain" | "TLS"
    tls_subject: str | None
    outcome: str  # "accepted" | "rejected: <why>"
    ended: str
    instances_stored: int
    study_uids: tuple[str, ...]
    requested_at: datetime
    closed_at: datetime


def association(db: Database, facts: AssociationLike, patient_names: bool = False) -> None:
    """Record one closed DICOM association: peer address and port, calling and called AE
    titles, plain or TLS (with the verified certificate subject), accepted or rejected
    (why), how it ended, instances stored and the studies they belong to. An association
    with exactly one study names it (and its patient); several are listed in ``detail``.

    Called by the listener's thread when an association closes: a database error is
    logged, not raised (the listener keeps serving; the log line of the association
    stays).
    """
    try:
        _association(db, facts, patient_names)
    except Exception:
        log.exception(
            "audit record of the association from %s@%s failed",
            facts.calling_ae,
            facts.peer_address,
        )


def _association(db: Database, facts: AssociationLike, patient_names: bool) -> None:
    accepted = facts.outcome == "accepted"
    studies = tuple(facts.study_uids)
    record(
        db,
        Action.DICOM_ASSOCIATION,
        Actor(facts.calling_ae or "?", "dicom", f"{facts.peer_address}:{facts.peer_port}"),
        outcome=Outcome.SUCCESS if accepted else Outcome.DENIED,
        object_type="association",
        object_id=facts.called_ae,
        study_uid=studies[0] if len(studies) == 1 else None,
        detail={
            "called_ae": facts.called_ae,
            "transport": facts.transport,
            "tls_subject": facts.tls_subject,
            "outcome": facts.outcome,
            "ended": facts.ended,
            "instances_stored": facts.instances_stored,
            "study_uids": list(studies),
            "duration_s": round((facts.closed_at - facts.requested_at).total_seconds(), 3),
        },
        patient_names=patient_names,
    )


def settings_digest(settings: Any) -> str:
    """SHA-256 of the settings in force (JSON, keys sorted): equal digests, equal settings."""
    data = settings.model_dump(mode="json")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# -- reading: search and export -----------------------------------------------------------


def as_dict(row: AuditRecord) -> dict[str, Any]:
    """One record as JSON-ready data (``patient_name`` only when it was recorded)."""
    data = {
        "id": row.id,
        "at": row.at.astimezone(UTC).isoformat(),
        "actor": row.actor,
        "actor_kind": row.actor_kind,
        "source": row.source,
        "action": row.action,
        "outcome": row.outcome,
        "object_type": row.object_type,
        "object_id": row.object_id,
        "study_uid": row.study_uid,
        "patient_id": row.patient_id,
        "detail": row.detail,
    }
    if row.patient_name:
        data["patient_name"] = row.patient_name
    return data


@dataclass(frozen=True)
class Query:
    """Filters of a search or an export; every given field must match (text exactly,
    ``since`` inclusive, ``until`` exclusive, ``before_id`` for paging back)."""

    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_id: int | None = None
    after_id: int | None = None

    def statement(self) -> Any:
        q = select(AuditRecord)
        for column, value in (
            (AuditRecord.actor, self.actor),
            (AuditRecord.action, self.action),
            (AuditRecord.outcome, self.outcome),
            (AuditRecord.study_uid, self.study_uid),
            (AuditRecord.patient_id, self.patient_id),
            (AuditRecord.source, self.source),
        ):
            if value:
                q = q.where(column == value)
        if self.since is not None:
            q = q.where(AuditRecord.at >= self.since)
        if self.until is not None:
            q = q.where(AuditRecord.at < self.until)
        if self.before_id is not None:
            q = q.where(AuditRecord.id < self.before_id)
        if self.after_id is not None:
            q = q.where(AuditRecord.id > self.after_id)
        return q


def search(db: Database, query: Query, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` records matching ``query``, newest first."""
    with db.session() as s:
        rows = s.scalars(query.statement().order_by(AuditRecord.id.desc()).limit(limit)).all()
        return [as_dict(r) for r in rows]


def export_lines(db: Database, query: Query, batch: int = 1000) -> Iterator[str]:
    """Every matching record, oldest first, as JSON lines (one object and a newline each);
    read in batches, so an export of years does not sit in memory."""
    after = query.after_id or 0
    while True:
        with db.session() as s:
            rows = s.scalars(
                Query(**{**query.__dict__, "after_id": after})
                .statement()
                .order_by(AuditRecord.id)
                .limit(batch)
            ).all()
            lines = [json.dumps(as_dict(r), ensure_ascii=False) + "\n" for r in rows]
        if not rows:
            return
        yield from lines
        after = rows[-1].id


# -- syslog (RFC 5424) ---------------------------------------------------------------------

# RFC 5424 section 6.2.1: severity 5 notice for what went as asked, 4 warning otherwise.
_SEVERITY = {"success": 5, "failure": 4, "denied": 4}
# RFC 5426 section 3.2: keep datagrams well under the path MTU limits
UDP_MAX_BYTES = 8192
# SQLite commits one writer at a time, in id order; PostgreSQL may not (see forward_once).
COMMIT_LAG = timedelta(seconds=2)


def _printable(value: str, size: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII (33-126), at most ``size``, "-" if empty."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:size]
    return text or "-"


def syslog_message(data: dict[str, Any], facility: int, app_name: str, hostname: str) -> bytes:
    """One audit record as an RFC 5424 message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME
    PROCID MSGID - MSG`` with MSGID the action and MSG the record's JSON (UTF-8, with the
    BOM section 6.4 asks for). TIMESTAMP is the record's time in UTC."""
    pri = facility * 8 + _SEVERITY.get(str(data.get("outcome")), 5)
    at = datetime.fromisoformat(data["at"]).astimezone(UTC)
    timestamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = (
        f"<{pri}>1 {timestamp} {_printable(hostname, 255)} {_printable(app_name, 48)} "
        f"{os.getpid()} {_printable(str(data['action']), 32)} -"
    )
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return header.encode("ascii") + b" \xef\xbb\xbf" + body.encode("utf-8")


class SyslogForwarder:
    """Forwards the audit trail to a syslog collector, in order, from where it left off.

    Records are read from the database (so those written by the CLI or another process
    go too) after ``audit_forwarding.last_id`` and the cursor moves on once the transport
    took them: UDP one datagram each (RFC 5426), TCP and TLS with octet-counting frames
    (RFC 6587 3.4.1, RFC 5425 4.3). When the collector does not answer, forwarding waits
    and resumes where it stopped; the database keeps every record whatever happens.
    """

    CURSOR = "syslog"
    BATCH = 500

    def __init__(self, db: Database, settings: SyslogSettings, interval_s: float = 1.0) -> None:
        self.db = db
        self.settings = settings
        self.interval_s = interval_s
        self.hostname = socket.gethostname()
        self._sock: socket.socket | None = None
        self._failing_since: datetime | None = None

    # -- cursor ------------------------------------------------------------------------
    def cursor(self) -> int:
        with self.db.session() as s:
            row = s.get(AuditForwarding, self.CURSOR)
            return row.last_id if row else 0

    def _advance(self, last_id: int) -> None:
        with self.db.session() as s:
            row = s.get(AuditForwarding, self.CURSOR)
            if row is None:
                s.add(AuditForwarding(name=self.CURSOR, last_id=last_id, updated_at=utcnow()))
            else:
                row.last_id, row.updated_at = last_id, utcnow()

    # -- transport ---------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        cfg = self.settings
        if cfg.protocol == "udp":
            info = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.connect(info[4])
            return sock
        sock = socket.create_connection((cfg.host, cfg.port), timeout=10)
        if cfg.protocol == "tls":
            context = ssl.create_default_context(
                cafile=str(cfg.ca_bundle) if cfg.ca_bundle else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            sock = context.wrap_socket(sock, server_hostname=cfg.host)
        return sock

    def _send(self, message: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.settings.protocol == "udp":
            self._sock.send(message[:UDP_MAX_BYTES])
        else:
            self._sock.sendall(str(len(message)).encode("ascii") + b" " + message)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # -- loop --------------------------------------------------------------------------
    def forward_once(self) -> int:
        """Send every record after the cursor (in batches); returns how many were sent.
        Raises ``OSError`` when the collector cannot be reached (the cursor stays at the
        last record sent)."""
        sent = 0
        after = self.cursor()
        while True:
            query = select(AuditRecord).where(AuditRecord.id > after)
            if not self.db.is_sqlite:
                # PostgreSQL hands out ids before commit, so a smaller id can become
                # visible after a larger one; records settle for COMMIT_LAG_S first.
                query = query.where(AuditRecord.at < utcnow() - COMMIT_LAG)
            with self.db.session() as s:
                rows = s.scalars(query.order_by(AuditRecord.id).limit(self.BATCH)).all()
                batch = [as_dict(r) for r in rows]
            if not batch:
                return sent
            try:
                for data in batch:
                    self._send(
                        syslog_message(
                            data, self.settings.facility, self.settings.app_name, self.hostname
                        )
                    )
                    after = data["id"]
                    sent += 1
            finally:
                if sent:
                    self._advance(after)

    def run_forever(self, stop: threading.Event) -> None:
        """Forward every ``interval_s`` until ``stop``; a collector that
        does not answer is logged once per outage and retried with a growing delay."""
        delay = self.interval_s
        while not stop.is_set():
            try:
                self.forward_once()
                if self._failing_since is not None:
                    log.warning("audit syslog collector %s reachable again", self._target())
                self._failing_since = None
                delay = self.interval_s
            except OSError as exc:
                self.close()
                if self._failing_since is None:
                    self._failing_since = utcnow()
                    log.error(
                        "audit syslog collector %s: %s; records stay in the database and "
                        "are forwarded when it answers",
                        self._target(),
                        exc,
                    )
                delay = min(60.0, delay * 2)
            except Exception:
                log.exception("audit syslog forwarding error")
                delay = min(60.0, delay * 2)
            if stop.wait(delay):
                break
        self.close()

    def _target(self) -> str:
        cfg = self.settings
        return f"{cfg.protocol}://{cfg.host}:{cfg.port}"
