"""The node's health for machines: ``/healthz`` (liveness, with reasons), ``/readyz``
(readiness) and the metrics read the same checks.

Readiness is the receive path: the database answers, the spool has room, the DICOM
listener listens and every loop thread is alive; when one fails the node cannot take
studies safely and ``/readyz`` answers 503. Degraded adds what the node cannot deliver:
a destination that does not answer, or results waiting longer than
``health.pending_alert_s``, and a rules file edited on disk that the node rejected (it
routes by the previous rules until the file is fixed). ``/healthz`` always answers 200
while the process serves (liveness) and says ``degraded`` with the reasons, so
monitoring can alert on the ``status`` field (or on ``dicom_node_degraded``) without a
restart loop.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from dicom_node.health import DestinationHealth, destination_health
from dicom_node.view import ServiceView
from kernel import webhooks


@dataclass
class Checks:
    """The result of one round of checks."""

    ready: bool
    reasons: list[str] = field(default_factory=list)  # why not ready, or degraded
    details: dict[str, Any] = field(default_factory=dict)
    destinations: dict[str, DestinationHealth] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "degraded" if self.degraded else "ok",
            "ready": self.ready,
            "reasons": self.reasons,
            **self.details,
            "destinations": {
                name: {"state": str(h.state), "reason": h.reason, "pending": h.pending}
                for name, h in self.destinations.items()
            },
        }


# Less free space than this cannot hold one more CT image (a 512 x 512 slice is 0.5 MiB):
# the spool is full whatever min_free_bytes says (with min_free_bytes 0, 0 bytes free used
# to pass as "ok" while every C-STORE was refused).
SPOOL_FULL_BELOW_BYTES = 1 << 20


def spool_state(free_bytes: int, min_free_bytes: int) -> str:
    """``full`` (no room for an image), ``below watermark`` (the spool refuses every
    instance: ``dicom_node.spool.Spool.check_space`` needs free - size >= min_free_bytes)
    or ``ok``."""
    if free_bytes < SPOOL_FULL_BELOW_BYTES:
        return "full"
    if free_bytes <= min_free_bytes:
        return "below watermark"
    return "ok"


def _check_spool(node: ServiceView, details: dict[str, Any]) -> str | None:
    """The spool's disk state into ``details``; the reason when C-STOREs are refused."""
    spool_dir, watermark = node.settings.spool_dir, node.settings.min_free_bytes
    try:
        usage = shutil.disk_usage(spool_dir)
    except OSError as exc:
        details["spool"] = f"error: {exc.strerror or type(exc).__name__}"
        return f"spool {spool_dir} cannot be read: {exc.strerror or exc}"
    state = spool_state(usage.free, watermark)
    details.update(
        spool=state,
        spool_free_bytes=usage.free,
        spool_total_bytes=usage.total,
        spool_min_free_bytes=watermark,
    )
    if state == "full":
        return (
            f"spool disk full: {usage.free} B free of {usage.total} B; every C-STORE is "
            "refused (0xA700 Out of Resources)"
        )
    if state == "below watermark":
        return (
            f"spool free space {usage.free} B is at or below min_free_bytes ({watermark} B); "
            "every C-STORE is refused (0xA700 Out of Resources)"
        )
    return None


def _check_webhooks(node: ServiceView, details: dict[str, Any]) -> str | None:
    """The webhook backlog into ``details["webhooks"]``; the reason when deliveries are
    overdue (due longer than ``webhooks.overdue_alert_s``: the sender is stuck or does
    not keep up, whether or not its thread is alive)."""
    settings = node.settings.webhooks
    try:
        with node.db.session() as s:
            backlog = webhooks.backlog(s, settings)
    except Exception as exc:  # report, don't raise
        details["webhooks"] = {"error": type(exc).__name__}
        return None  # the database check says it
    details["webhooks"] = {
        "undelivered": backlog.undelivered,
        "overdue": backlog.overdue,
        "oldest_overdue_s": backlog.oldest_overdue_s,
    }
    if not backlog.overdue:
        return None
    return (
        f"webhook deliveries overdue: {backlog.overdue} due for over "
        f"{settings.overdue_alert_s:g} s (oldest {backlog.oldest_overdue_s:g} s)"
    )


def _check_rules(node: ServiceView, details: dict[str, Any]) -> str | None:
    """Whether the rules file on disk is the one in force: an edit the node rejected
    (the previous rules stay in force) degrades the node until the file is fixed, so an
    administrator's monitoring sees that the change did not take effect."""
    holder = node.rules
    try:
        holder.get()  # re-reads the file when it changed since the last look
    except Exception as exc:  # report, don't raise
        details["rules"] = f"error: {type(exc).__name__}"
        return f"rules: {type(exc).__name__}"
    last = holder.last_reload
    details["rules"] = "ok" if last.ok else "rejected"
    if last.ok:
        return None
    first_line = last.message.strip().splitlines()[0] if last.message.strip() else ""
    return (
        f"rules file {holder.path} changed and was rejected at "
        f"{last.at.strftime('%Y-%m-%d %H:%M:%S')} UTC; the previous rules stay in force: "
        f"{first_line}"
    )


def run_checks(node: ServiceView) -> Checks:
    """Check the receive path and the destinations (never raises)."""
    details: dict[str, Any] = {}
    reasons: list[str] = []
    health: dict[str, DestinationHealth] = {}
    try:
        with node.db.session() as s:
            s.execute(text("SELECT 1"))
            health = destination_health(s, node.settings)
        details["database"] = "ok"
    except Exception as exc:  # report, don't raise
        details["database"] = f"error: {type(exc).__name__}"
        reasons.append(f"database: {type(exc).__name__}")
    spool_reason = _check_spool(node, details)
    if spool_reason is not None:
        reasons.append(spool_reason)
    details["scp_listening"] = node.listening()
    if not details["scp_listening"]:
        reasons.append("the DICOM listener is not listening")
    alive = node.loops()
    details["threads"] = alive
    details["workers_alive"] = all(alive.values())
    dead = [name for name, ok in alive.items() if not ok]
    if dead:
        reasons.append(f"loop threads stopped: {', '.join(dead)}")
    ready = not reasons
    webhook_reason = _check_webhooks(node, details)
    if webhook_reason is not None:
        reasons.append(webhook_reason)
    rules_reason = _check_rules(node, details)
    if rules_reason is not None:
        reasons.append(rules_reason)
    for h in health.values():
        if h.alert:
            reasons.append(f"destination {h.name} {h.state}: {h.reason}")
    return Checks(ready, reasons, details, health)
