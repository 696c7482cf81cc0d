"""Job status webhooks: the one writer of the ``webhook_deliveries`` table.

A job may carry ``update_urls`` (the pipeline's ``update_url`` from the rules file and
the path API request's own). When the job ends (done, failed, cancelled, expired) the job
queue calls ``job_ended`` in the transaction that sets the final state, so the
notification is recorded with the state or not at all: one row per URL holding the exact
JSON body. The node's webhook sender (``dicom_node.webhook_sender``) claims due rows,
POSTs them signed (``signed_headers``) and records each answer here (``record``):
2xx delivered, 5xx / 408 / 429 / no answer retried with backoff (``webhook_policy``),
any other answer failed at once with the reason. Rows a stopped node left ``sending`` go
again at the next start (``reset_interrupted``): a receiver may see a delivery twice
(same ``X-Dicom-Node-Delivery``), never lose one.

The body carries UIDs, paths, states and times only: never a patient's name or ID.
Pages and events show a URL as ``display_url`` (scheme, host and port: no path, query
or credentials, which may hold tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Job, Result, WebhookDelivery, utcnow
from db.session import Database
from kernel.events import add_event
from kernel.retry import RetryPolicy
from kernel.settings import WebhookSettings
from kernel.vocabulary import EventKind, EventLevel, JobState

SIGNATURE_HEADER = "X-Dicom-Node-Signature"
TIMESTAMP_HEADER = "X-Dicom-Node-Timestamp"
DELIVERY_HEADER = "X-Dicom-Node-Delivery"
# The job states a notification is sent for.
ENDED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})


class WebhookState(StrEnum):
    """A delivery (``webhook_deliveries.state``): PENDING (due at ``next_attempt_at``) ->
    SENDING (a sender holds it) -> DELIVERED (a 2xx answer), back to PENDING after a
    retryable outcome, or FAILED (refused, or attempts used up; ``last_error`` says why)."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookUrlError(ValueError):
    """An ``update_url`` the node will not POST to; the message says what is wrong."""


# Never POSTed to unless listed in webhooks.allowed_hosts: the node's own and the cloud's
# internal services (SSRF). Private ranges (10/8, 172.16/12, 192.168/16) stay allowed.
_METADATA_NETWORKS = (
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS instance metadata over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host" on Linux
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_refusal(address: Address) -> str | None:
    """What kind of address the node will not POST to ``address`` is ("a loopback
    address", ...), None for one it will: loopback, link-local (169.254.0.0/16 with the
    cloud metadata service, fe80::/10), unspecified (0.0.0.0/8, ::), multicast,
    broadcast and known cloud metadata addresses. IPv4-mapped IPv6 counts as its IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in _METADATA_NETWORKS):
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or (address.version == 4 and address in _THIS_NETWORK):
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "a broadcast address"
    return None


def _literal_address(host: str) -> Address | None:
    """The address a URL's host is written as (IPv4 also in the short, decimal and hex
    forms the resolver takes, e.g. 127.1 or 2130706433), None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _listed(host: str, address: Address | None, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``webhooks.allowed_hosts`` names ``host`` exactly or holds ``address``."""
    name = host.lower().rstrip(".")
    for entry in allowed_hosts:
        if entry == name:
            return True
        if address is not None and "/" in entry:
            net = ipaddress.ip_network(entry, strict=False)
            mapped = getattr(address, "ipv4_mapped", None) or address
            if mapped.version == net.version and mapped in net:
                return True
    return False


def host_refusal(
    host: str, addresses: Sequence[Address], allowed_hosts: Sequence[str]
) -> str | None:
    """Why ``host``, reached at ``addresses`` (what it resolved to, or its literal
    address), is refused; None when every address is allowed or listed in
    ``webhooks.allowed_hosts``."""
    for address in addresses:
        kind = address_refusal(address)
        if kind is not None and not _listed(host, address, allowed_hosts):
            shown = host if str(address) == host else f"{host} ({address})"
            return (
                f"{shown} is {kind}; the node does not POST to its own or internal services "
                "unless webhooks.allowed_hosts lists the host"
            )
    return None


def check_url(
    url: object, what: str = "update_url", allowed_hosts: Sequence[str] | None = ()
) -> str:
    """``url`` stripped, when it is an absolute http:// or https:// URL with a host;
    raises ``WebhookUrlError`` naming ``what`` otherwise (file:, ftp:, relative, ...).

    Refused too: a user name or password in the URL, and (unless ``allowed_hosts``,
    ``webhooks.allowed_hosts``, lists the host) a host written as a loopback, link-local,
    unspecified, multicast or metadata address or named ``localhost`` (``host_refusal``;
    the sender checks what a name resolves to when it sends). ``allowed_hosts`` None
    skips the address check (a tool reading a rules file without the node's settings)."""
    if not isinstance(url, str) or not url.strip():
        raise WebhookUrlError(f"{what} must be an http:// or https:// URL")
    url = url.strip()
    if len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookUrlError(f"{what} is not a usable URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is no number)
    except ValueError as exc:
        raise WebhookUrlError(f"{what} {display_url(url)} is not a usable URL: {exc}") from None
    if parts.scheme.lower() in ("http", "https") and not parts.hostname:
        raise WebhookUrlError(f"{what} {parts.scheme}:// needs a host name or address")
    if parts.scheme.lower() not in ("http", "https"):
        shown = f"{parts.scheme}:" if parts.scheme else "a relative URL"
        raise WebhookUrlError(f"{what} must be an http:// or https:// URL with a host, not {shown}")
    if "@" in parts.netloc:
        raise WebhookUrlError(
            f"{what} {display_url(url)} must not carry a user name or password (a token "
            "may go in the path or query; webhooks.secret_file signs every POST)"
        )
    if allowed_hosts is not None:
        host = parts.hostname or ""
        address = _literal_address(host)
        if address is not None:
            reason = host_refusal(host, [address], allowed_hosts)
        elif host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
            loopback = ipaddress.ip_address("127.0.0.1")
            reason = host_refusal(host, [loopback], allowed_hosts)
        else:
            reason = None
        if reason is not None:
            raise WebhookUrlError(f"{what} refused: {reason}")
    return url


def display_url(url: str) -> str:
    """What pages, events and logs show of a webhook URL: scheme, host and port (the
    path, query and user info may carry tokens and are never shown)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unusable URL)"
    host = parts.hostname or "?"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def merge_urls(*urls: str | None) -> list[str]:
    """The URLs given (None skipped), each once, in order."""
    out: list[str] = []
    for url in urls:
        if url and url not in out:
            out.append(url)
    return out


# -- recording a job's end --------------------------------------------------------------


def _utc(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def body_of(session: Session, job: Job, delivery_id: int) -> dict[str, Any]:
    """The notification of ``job`` as it ended: ids, states, UIDs, result UIDs or the
    mask path, times (ISO 8601 UTC). ``delivery_id`` lets a receiver drop a repeat."""
    inputs = job.inputs or {}
    done = job.state == JobState.DONE
    summary = job.summary or {}
    results = []
    if done:
        rows = session.scalars(
            select(Result)
            .where(Result.job_id == job.id, Result.superseded_at.is_(None))
            .order_by(Result.id)
        ).all()
        results = [
            {
                "sop_uid": r.sop_uid,
                "series_uid": r.series_uid,
                "sop_class_uid": r.sop_class_uid,
                "kind": r.kind,
                "result_type": r.result_type,
                "source_series_uid": r.source_series_uid,
            }
            for r in rows
        ]
    return {
        "delivery_id": delivery_id,
        "job_id": job.id,
        "pipeline": job.pipeline,
        "status": str(job.state),
        "error": None if done else job.last_error,
        "attempts": job.attempts,
        "study_uid": job.study.study_uid if job.study is not None else None,
        "series_uids": {role: v for role, v in inputs.items() if isinstance(v, str)},
        "input_paths": {
            role: v["path"] for role, v in inputs.items() if isinstance(v, dict) and "path" in v
        },
        "results": results,
        "mask_path": summary.get("mask_path") if done else None,
        "probabilities_path": summary.get("probabilities_path") if done else None,
        "queued_at": _utc(job.queued_at),
        "started_at": _utc(job.started_at),
        "finished_at": _utc(job.finished_at),
    }


def encode(body: dict[str, Any]) -> str:
    """The body's JSON text, compact and ASCII only: its UTF-8 bytes are what is sent."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def job_ended(session: Session, job: Job) -> int:
    """Record one delivery per ``job.update_urls`` for a job that just ended, in
    ``session``'s transaction (the one that set the final state). Returns how many.

    Called by ``inference.queue`` wherever a job reaches done, failed, cancelled or
    expired; a job retried by a user and ending again notifies again.
    """
    if job.state not in ENDED_STATES or not job.update_urls:
        return 0
    now = utcnow()
    count = 0
    for url in job.update_urls:
        row = WebhookDelivery(
            job_id=job.id,
            study_id=job.study_id,
            url=str(url),
            job_state=str(job.state),
            body="",
            state=WebhookState.PENDING,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
        session.add(row)
        session.flush()  # the id goes into the body
        row.body = encode(body_of(session, job, row.id))
        count += 1
    return count


# -- signing -----------------------------------------------------------------------------


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with ``secret`` over ``<timestamp>.<body>`` (the
    timestamp's ASCII digits, a dot, the body's exact bytes)."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(
    secret: bytes | None, body: bytes, delivery_id: int, now_s: float | None = None
) -> dict[str, str]:
    """The headers of one POST: JSON content type, the delivery id, the time (Unix
    seconds) and, with a ``secret``, the signature over both (``sign``)."""
    timestamp = str(int(time.time() if now_s is None else now_s))
    headers = {
        "Content-Type": "application/json",
        DELIVERY_HEADER: str(delivery_id),
        TIMESTAMP_HEADER: timestamp,
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    return headers


# -- delivering ----------------------------------------------------------------------------

Verdict = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True)
class Outcome:
    """What one POST came to: ``delivered`` (2xx), ``retry`` (5xx, 408, 429, no answer)
    or ``failed`` (any other answer: a retry would be refused again). ``http_status``:
    the answer's status code, None without an answer; ``detail``: the reason in words."""

    state: Verdict
    http_status: int | None
    detail: str


def webhook_policy(settings: WebhookSettings) -> RetryPolicy:
    """``webhooks.*`` as a retry policy, 50 % jitter; a ``failed`` outcome is final."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_s=settings.retry_initial_s,
        cap_s=settings.retry_max_s,
        jitter=0.5,
        permanent=lambda out: isinstance(out, Outcome) and out.state == "failed",
    )


# How many due rows ``claim_due`` looks through for ones its ``take`` accepts.
CLAIM_SCAN_ROWS = 256


def claim_due(
    db: Database, limit: int, sender: str, take: Callable[[str], bool] | None = None
) -> list[WebhookDelivery]:
    """Up to ``limit`` due pending rows, marked ``sending`` by ``sender`` and committed
    before they are returned (detached). Concurrent claimers get disjoint rows (FOR
    UPDATE SKIP LOCKED where the database has it). ``take``: called with each due row's
    URL, oldest due first (up to ``CLAIM_SCAN_ROWS``), until ``limit`` are taken; a row
    it says False to stays pending (the sender's limit per receiver)."""
    if limit <= 0:
        return []
    now = utcnow()
    with db.session() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.state == WebhookState.PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit if take is None else max(limit, CLAIM_SCAN_ROWS))
            .with_for_update(skip_locked=True)
        ).all()
        if take is not None:
            taken: list[WebhookDelivery] = []
            for row in rows:
                if len(taken) >= limit:
                    break
                if take(row.url):
                    taken.append(row)
            rows = taken
        for row in rows:
            row.state = WebhookState.SENDING
            row.sending_since, row.sending_by = now, sender
        s.flush()
        for row in rows:
            s.expunge(row)
    return list(rows)


def release_unsent(db: Database, ids: list[int]) -> int:
    """Rows claimed and not tried (the sender stops): pending again, no attempt counted."""
    if not ids:
        return 0
    with db.session() as s:
        rows = s.scalars(
            select(WebhookDelivery).where(
                WebhookDelivery.id.in_(ids), WebhookDelivery.state == WebhookState.SENDING
            )
        ).all()
        for row in rows:
            row.state = WebhookState.PENDING
            row.sending_since = row.sending_by = None
        return len(rows)


def _event(
    s: Session, row: WebhookDelivery, kind: EventKind, message: str, level: EventLevel
) -> None:
    job = s.get(Job, row.job_id)
    add_event(
        s,
        kind,
        f"job {row.job_id} ({job.pipeline if job else '?'}) {row.job_state}: webhook to "
        f"{display_url(row.url)} {message}",
        level=level,
        study_uid=job.study.study_uid if job is not None and job.study is not None else None,
        job_id=row.job_id,
        data={"webhook_delivery_id": row.id, "http_status": row.last_status},
    )


def record(db: Database, delivery_id: int, outcome: Outcome, settings: WebhookSettings) -> str:
    """Record one POST of a row: delivered, pending again after a backoff, or failed.
    Returns the row's state afterwards."""
    now = utcnow()
    with db.session() as s:
        row = s.get_one(WebhookDelivery, delivery_id)
        row.sending_since = row.sending_by = None
        row.attempts += 1
        row.last_attempt_at = now
        row.last_status = outcome.http_status
        if outcome.state == "delivered":
            row.state, row.delivered_at, row.last_error = WebhookState.DELIVERED, now, None
            _event(
                s,
                row,
                EventKind.WEBHOOK_SENT,
                f"delivered ({outcome.detail}, attempt {row.attempts})",
                EventLevel.INFO,
            )
            return row.state
        row.last_error = outcome.detail
        delay = webhook_policy(settings).next_delay_s(row.attempts, outcome)
        if delay is not None:
            row.state = WebhookState.PENDING
            row.next_attempt_at = now + timedelta(seconds=delay)
            _event(
                s,
                row,
                EventKind.WEBHOOK_RETRY,
                f"{outcome.detail}; attempt {row.attempts}, next in {delay:.1f} s",
                EventLevel.WARNING,
            )
            return row.state
        row.state = WebhookState.FAILED
        if outcome.state == "failed":
            row.last_error = f"{outcome.detail}; not retried (the receiver refused it)"
        else:
            row.last_error = f"{outcome.detail}; gave up after {row.attempts} attempts"
        _event(s, row, EventKind.WEBHOOK_FAILED, f"failed: {row.last_error}", EventLevel.ERROR)
        return row.state


def reset_interrupted(db: Database) -> int:
    """Rows left ``sending`` by a stopped node are pending again, due now (the POST may
    or may not have arrived: it goes again). Returns how many."""
    now = utcnow()
    with db.session() as s:
        rows = s.scalars(
            select(WebhookDelivery).where(WebhookDelivery.state == WebhookState.SENDING)
        ).all()
        for row in rows:
            row.state = WebhookState.PENDING
            row.sending_since = row.sending_by = None
            row.next_attempt_at = now
        return len(rows)


@dataclass(frozen=True)
class Backlog:
    """Deliveries not yet made: ``undelivered`` (pending or sending), ``overdue`` (due,
    pending or being POSTed, for longer than ``webhooks.overdue_alert_s``: the sender
    does not keep up or is stuck) and how long the oldest of those has been due (s)."""

    undelivered: int
    overdue: int
    oldest_overdue_s: float | None


def backlog(session: Session, settings: WebhookSettings) -> Backlog:
    """The webhook backlog now (``Backlog``); a delivery waiting for its next attempt
    after a failed POST is not overdue until that attempt is due."""
    now = utcnow()
    waiting = WebhookDelivery.state.in_([WebhookState.PENDING, WebhookState.SENDING])
    undelivered = session.scalar(select(func.count()).where(waiting)) or 0
    late = waiting & (
        WebhookDelivery.next_attempt_at < now - timedelta(seconds=settings.overdue_alert_s)
    )
    overdue, oldest = session.execute(
        select(func.count(), func.min(WebhookDelivery.next_attempt_at)).where(late)
    ).one()
    oldest_s = None
    if oldest is not None:
        if oldest.tzinfo is None:  # SQLite gives naive UTC
            oldest = oldest.replace(tzinfo=now.tzinfo)
        oldest_s = round((now - oldest).total_seconds(), 1)
    return Backlog(undelivered, overdue or 0, oldest_s)


def as_dict(row: WebhookDelivery, pipeline: str | None = None) -> dict[str, Any]:
    """A delivery for pages and the JSON API: the URL as ``display_url`` only."""
    return {
        "id": row.id,
        "job_id": row.job_id,
        "pipeline": pipeline,
        "job_state": row.job_state,
        "url": display_url(row.url),
        "state": row.state,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "created_at": _utc(row.created_at),
        "last_attempt_at": _utc(row.last_attempt_at),
        "next_attempt_at": _utc(row.next_attempt_at) if row.state == WebhookState.PENDING else None,
        "delivered_at": _utc(row.delivered_at),
    }
