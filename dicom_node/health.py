"""Destination health from what actually happens: send outcomes and C-ECHOs.

The one writer of ``destination_echoes``. A C-ECHO (for a DICOMweb destination: a QIDO-RS
``GET {url}/studies?limit=1`` with its credentials, ``dicomweb_http.check_dicomweb``,
kept the same way) goes to every destination every
``health.echo_interval_s`` (``EchoLoop``) and whenever a user asks on the destinations
page; each answer is kept (``health.keep_echoes_days``). ``destination_health`` judges each
destination from its latest evidence, the newest of its latest C-ECHO and its latest send
attempt (``dispatches.last_attempt_at``): no answer, or a refusal without a DICOM status
(an HTTP 401 to a DICOMweb destination: "latest send refused: HTTP 401 ...", "QIDO-RS
check refused: HTTP 401 ..."), makes it unreachable; results waiting
longer than ``health.pending_alert_s`` are a backlog. The dashboard banner, ``/healthz``,
the study statuses ("delivery pending: pacs unreachable") and the metrics all read it.

When a destination answers again after it was unreachable, its sends waiting out a retry
backoff are made due at once (``outbox.due_now``), so results flow as soon as it is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from db.models import DestinationEcho, Dispatch, Event, utcnow
from db.session import Database
from dicom_node.dicomweb_http import check_answered, check_dicomweb
from dicom_node.echo import EchoAnswer, check
from kernel import outbox
from kernel.events import add_event
from kernel.settings import Destination, NodeSettings
from kernel.vocabulary import (
    DELIVERED_STATES,
    UNDELIVERED_STATES,
    DestinationState,
    EventKind,
    EventLevel,
    OutboxState,
    SendCause,
)

log = logging.getLogger("dicom_node.health")


@dataclass(frozen=True)
class Evidence:
    """One thing that happened with a destination: a C-ECHO or a send attempt."""

    at: datetime
    ok: bool
    what: str  # "C-ECHO (periodic)", "send"
    detail: str
    answered: bool = False  # not ok, but the destination answered (refused, HTTP 401 ...)


@dataclass(frozen=True)
class DestinationHealth:
    """How one destination is doing (``state``, in words ``reason``) and its outbox.

    ``pending``: rows waiting to be delivered, ``overdue``: those of them queued more
    than ``health.pending_alert_s`` ago, ``oldest_pending_s``: the longest wait (s);
    ``held``: waiting for a reviewer; ``failed``: failed for good. ``last_echo``: the
    latest C-ECHO (``at``, ``ok``, ``detail``, ``trigger``, ``requested_by``).
    """

    name: str
    kind: str  # dimse, dicomweb
    ae_title: str | None  # dimse
    host: str | None
    port: int | None
    url: str | None  # dicomweb (never credentials: settings refuse them in a URL)
    state: DestinationState
    reason: str
    since: datetime | None
    last_success_at: datetime | None
    last_echo: dict[str, Any] | None
    pending: int
    overdue: int
    oldest_pending_s: float | None
    held: int
    failed: int

    @property
    def alert(self) -> bool:
        """Whether this destination raises the dashboard banner and degrades /healthz."""
        return self.state in (DestinationState.UNREACHABLE, DestinationState.BACKLOG)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("since", "last_success_at"):
            out[key] = out[key].isoformat() if out[key] else None
        if self.last_echo:
            out["last_echo"] = {**self.last_echo, "at": self.last_echo["at"].isoformat()}
        out["alert"] = self.alert
        return out


# -- writing ------------------------------------------------------------------------------


def record_echo(
    db: Database,
    destination: str,
    answer: EchoAnswer,
    trigger: str,
    requested_by: str | None = None,
    probe: str = "C-ECHO",
) -> bool:
    """Keep one C-ECHO answer (``probe``: what was asked, "QIDO-RS" for DICOMweb); an
    answer that differs from the previous one is an event (``destination_down`` /
    ``destination_up``). Returns True when the destination answered again after the
    previous check got no answer."""
    with db.session() as s:
        previous = s.scalars(
            select(DestinationEcho)
            .where(DestinationEcho.destination == destination)
            .order_by(DestinationEcho.at.desc(), DestinationEcho.id.desc())
            .limit(1)
        ).first()
        s.add(
            DestinationEcho(
                destination=destination,
                at=utcnow(),
                ok=answer.ok,
                detail=answer.detail,
                round_trip_ms=answer.round_trip_ms,
                trigger=trigger,
                requested_by=requested_by,
            )
        )
        was_ok = previous.ok if previous is not None else True
        if was_ok and not answer.ok:
            add_event(
                s,
                EventKind.DESTINATION_DOWN,
                f"destination {destination} does not answer {probe}: {answer.detail}; "
                "results for it wait and are retried",
                level=EventLevel.ERROR,
                data={"destination": destination},
            )
        elif not was_ok and answer.ok:
            add_event(
                s,
                EventKind.DESTINATION_UP,
                f"destination {destination} answers {probe} again; waiting sends resume",
                data={"destination": destination},
            )
        return answer.ok and not was_ok


def prune_echoes(db: Database, keep_days: float) -> int:
    """Delete C-ECHO answers older than ``keep_days``; returns how many."""
    cutoff = utcnow() - timedelta(days=keep_days)
    with db.session() as s:
        return s.execute(delete(DestinationEcho).where(DestinationEcho.at < cutoff)).rowcount


def echo_destination(
    db: Database,
    settings: NodeSettings,
    name: str,
    trigger: str = "manual",
    requested_by: str | None = None,
    wake_dispatcher: Callable[[], None] | None = None,
) -> EchoAnswer:
    """C-ECHO the destination ``name`` (DICOMweb: QIDO-RS) now, keep the answer, and
    resume its waiting sends when it answers again. Raises ``KeyError`` for an unknown
    destination."""
    dest = settings.destination(name)
    if dest.kind == "dicomweb":
        answer = check_dicomweb(dest, timeout_s=settings.health.echo_timeout_s)
    else:
        answer = check(
            dest.host or "",
            dest.port or 0,
            dest.ae_title or "",
            dest.calling_ae_title or settings.ae_title,
            timeout_s=settings.health.echo_timeout_s,
            tls=dest.tls,
        )
    probe = "QIDO-RS" if dest.kind == "dicomweb" else "C-ECHO"
    back = record_echo(db, name, answer, trigger, requested_by, probe)
    if answer.ok and (back or _has_backoff(db, name)):
        resumed = outbox.due_now(db, name)
        if resumed:
            log.info("destination %s answers again: %d waiting sends are due now", name, resumed)
            if wake_dispatcher is not None:
                wake_dispatcher()
    return answer


def _has_backoff(db: Database, name: str) -> bool:
    """Whether sends to ``name`` wait out a retry backoff after getting no answer."""
    with db.session() as s:
        return (
            s.scalars(
                select(Dispatch.id)
                .where(
                    Dispatch.destination == name,
                    Dispatch.state == OutboxState.PENDING,
                    Dispatch.attempts > 0,
                    Dispatch.last_status.is_(None),
                    or_(Dispatch.last_cause.is_(None), Dispatch.last_cause != SendCause.NODE),
                    Dispatch.next_attempt_at > utcnow(),
                )
                .limit(1)
            ).first()
            is not None
        )


class EchoLoop:
    """C-ECHOes every destination every ``health.echo_interval_s`` (a loop thread)."""

    def __init__(
        self, db: Database, settings: NodeSettings, wake_dispatcher: Callable[[], None]
    ) -> None:
        self.db = db
        self.settings = settings
        self.wake_dispatcher = wake_dispatcher

    def poll(self) -> None:
        """One round: every destination once, then old answers pruned."""
        for dest in self.settings.destinations:
            try:
                echo_destination(
                    self.db, self.settings, dest.name, "periodic", None, self.wake_dispatcher
                )
            except Exception:
                log.exception("C-ECHO of destination %s failed", dest.name)
        prune_echoes(self.db, self.settings.health.keep_echoes_days)

    def run_forever(self, stop: threading.Event) -> None:
        interval = self.settings.health.echo_interval_s
        if interval <= 0 or not self.settings.destinations:
            stop.wait()  # nothing to do; stay alive so the loop list is stable
            return
        while not stop.is_set():
            self.poll()
            stop.wait(interval)


# -- reading ------------------------------------------------------------------------------


def _latest_echo(s: Session, name: str, ok: bool | None = None) -> DestinationEcho | None:
    query = select(DestinationEcho).where(DestinationEcho.destination == name)
    if ok is not None:
        query = query.where(DestinationEcho.ok.is_(ok))
    return s.scalars(
        query.order_by(DestinationEcho.at.desc(), DestinationEcho.id.desc()).limit(1)
    ).first()


def _latest_send(s: Session, name: str) -> Evidence | None:
    """The newest send attempt that tells something: delivered, answered, or no answer.
    An attempt this node failed itself (``SendCause.NODE``, e.g. a conversion it could
    not make) tells nothing about the destination and is passed over."""
    rows = s.scalars(
        select(Dispatch)
        .where(Dispatch.destination == name, Dispatch.last_attempt_at.is_not(None))
        .order_by(Dispatch.last_attempt_at.desc())
        .limit(5)
    ).all()
    for row in rows:
        at = row.last_attempt_at
        if row.last_cause == SendCause.NODE:
            continue
        if row.state in DELIVERED_STATES and row.sent_at is not None and row.sent_at >= at:
            return Evidence(at, True, "send", "delivered")
        if row.last_status is not None:  # it answered (maybe refusing): it is there
            return Evidence(at, True, "send", f"answered 0x{row.last_status:04X}")
        if row.last_error and row.attempts > 0:
            answered = row.last_cause == SendCause.DESTINATION  # e.g. HTTP 401, no status
            return Evidence(at, False, "send", row.last_error, answered)
    return None


def _last_send_success(s: Session, name: str) -> datetime | None:
    return s.scalar(
        select(func.max(Dispatch.sent_at)).where(
            Dispatch.destination == name, Dispatch.sent_at.is_not(None)
        )
    )


def _last_answer(s: Session, name: str, last_success: datetime | None) -> datetime | None:
    """When the destination last answered: a successful C-ECHO or send, or a send it
    answered with a refusal (it is there, it said no)."""
    answered = s.scalar(
        select(func.max(Dispatch.last_attempt_at)).where(
            Dispatch.destination == name, Dispatch.last_status.is_not(None)
        )
    )
    times = [t for t in (last_success, answered) if t is not None]
    return max(times) if times else None


def _outage_start(s: Session, name: str, last_success: datetime | None) -> datetime | None:
    """The first failure of the current run of failures: the earliest C-ECHO (QIDO-RS)
    without an answer and the earliest send retried or failed (its event) since the
    destination last answered. A later failure of the same outage does not move it."""
    bound = _last_answer(s, name, last_success)
    echoes = select(func.min(DestinationEcho.at)).where(
        DestinationEcho.destination == name, DestinationEcho.ok.is_(False)
    )
    sends = select(func.min(Event.at)).where(
        Event.kind.in_((EventKind.SEND_RETRY, EventKind.SEND_FAILED)),
        Event.data["destination"].as_string() == name,
    )
    if bound is not None:
        echoes = echoes.where(DestinationEcho.at > bound)
        sends = sends.where(Event.at > bound)
    firsts = [t for t in (s.scalar(echoes), s.scalar(sends)) if t is not None]
    return min(firsts) if firsts else None


def _echo_dict(row: DestinationEcho | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "at": row.at,
        "ok": row.ok,
        "detail": row.detail,
        "trigger": row.trigger,
        "requested_by": row.requested_by,
        "round_trip_ms": row.round_trip_ms,
    }


def _failure_reason(latest: Evidence) -> str:
    """Why the latest evidence is not ok, in words: no answer, or what the answer was."""
    if not latest.answered:
        return f"no answer to the latest {latest.what}: {latest.detail}"
    if latest.what != "send":
        return latest.detail  # "QIDO-RS check refused: HTTP 401 ..." says it all
    verb = "not confirmed" if latest.detail.startswith("HTTP 2") else "refused"
    return f"latest send {verb}: {latest.detail}"


def health_of(
    s: Session, dest: Destination, pending_alert_s: float, now: datetime | None = None
) -> DestinationHealth:
    """The health of one destination (see the module docstring)."""
    now = now or utcnow()
    echo = _latest_echo(s, dest.name)
    evidence = [e for e in (_latest_send(s, dest.name),) if e is not None]
    if echo is not None:
        probe = "QIDO-RS" if dest.kind == "dicomweb" else "C-ECHO"
        answered = dest.kind == "dicomweb" and check_answered(echo.detail)
        evidence.append(
            Evidence(echo.at, echo.ok, f"{probe} ({echo.trigger})", echo.detail, answered)
        )
    latest = max(evidence, key=lambda e: e.at) if evidence else None
    ok_echo = _latest_echo(s, dest.name, ok=True)
    successes = [
        t
        for t in (ok_echo.at if ok_echo else None, _last_send_success(s, dest.name))
        if t is not None
    ]
    last_success = max(successes) if successes else None

    counts = dict(
        s.execute(
            select(Dispatch.state, func.count())
            .where(Dispatch.destination == dest.name)
            .group_by(Dispatch.state)
        ).all()
    )
    queued_at = func.coalesce(Dispatch.queued_at, Dispatch.created_at)
    oldest = s.scalar(
        select(func.min(queued_at)).where(
            Dispatch.destination == dest.name, Dispatch.state.in_(UNDELIVERED_STATES)
        )
    )
    cutoff = now - timedelta(seconds=pending_alert_s)
    overdue = s.scalar(
        select(func.count()).where(
            Dispatch.destination == dest.name,
            Dispatch.state.in_(UNDELIVERED_STATES),
            queued_at < cutoff,
        )
    )
    pending = sum(counts.get(state, 0) for state in UNDELIVERED_STATES)
    oldest_s = (now - oldest).total_seconds() if oldest is not None else None

    since = None
    if latest is None:
        state, reason = DestinationState.UNKNOWN, "not checked yet (no send, no C-ECHO)"
    elif not latest.ok:
        state = DestinationState.UNREACHABLE
        since = _outage_start(s, dest.name, last_success) or latest.at
        reason = _failure_reason(latest)
        if pending:
            reason += f"; {pending} waiting to be sent"
    elif overdue:
        state = DestinationState.BACKLOG
        reason = (
            f"{overdue} waiting longer than {pending_alert_s:g} s to be delivered "
            f"(oldest {oldest_s:.0f} s)"
        )
    else:
        state, reason = DestinationState.OK, f"answers ({latest.what}: {latest.detail})"
        if pending:
            reason += f"; {pending} on their way"
    return DestinationHealth(
        name=dest.name,
        kind=dest.kind,
        ae_title=dest.ae_title,
        host=dest.host,
        port=dest.port,
        url=dest.url,
        state=state,
        reason=reason,
        since=since,
        last_success_at=last_success,
        last_echo=_echo_dict(echo),
        pending=pending,
        overdue=int(overdue or 0),
        oldest_pending_s=oldest_s,
        held=counts.get(OutboxState.HELD, 0),
        failed=counts.get(OutboxState.FAILED, 0),
    )


def destination_health(s: Session, settings: NodeSettings) -> dict[str, DestinationHealth]:
    """Name -> health of every configured destination."""
    now = utcnow()
    return {
        d.name: health_of(s, d, settings.health.pending_alert_s, now) for d in settings.destinations
    }
