"""The one status vocabulary of a study and of each pipeline or forward in it.

Every page, the JSON API and the metrics show the status derived here
(``kernel.vocabulary.DeliveryStatus``) with its reason, from the rows the node keeps: the
series (receiving, routed), the routed events (which pipelines the rules asked for, or
why no rule matched), the jobs, their current results, the outbox rows of those results
and of the forwarded originals, and the destinations' health (``dicom_node.health``).

Per pipeline (its latest job):

- no job yet: WAITING for inputs (which, and when the study settles), or NOT_RUN once the
  study settled (``dicom_node.waiting``'s words);
- queued / running: QUEUED / RUNNING; failed or expired: FAILED (why); cancelled: CANCELLED;
- done: from its results' deliveries: HELD (a reviewer must decide), DELIVERY_PENDING
  (why: the destination does not answer, or the send is on its way), DELIVERED (or
  DELIVERED_NO_FINDING for a "no finding" object), NOT_SENT (found nothing with
  ``empty_result: skip``, or no destination), REJECTED (by whom, why), FAILED (the send
  failed for good), PARTIALLY_DELIVERED (some results or destinations got through, some
  did not).

Forwards are one item per destination, delivered / pending / failed the same way.

The study: a failure for good shows first, even while other work is in progress (the
reason names what is still in progress); then work in progress (DELIVERY_PENDING, HELD,
RUNNING, QUEUED, RECEIVING, WAITING, in that order); when everything ended, DELIVERED
when every item got through or had nothing to deliver (found nothing, or its phase never
came: NOT_SENT and NOT_RUN items are named in the reason), PARTIALLY_DELIVERED when some
got through and
others failed, were rejected or cancelled, else the worst of FAILED, REJECTED, CANCELLED
(or NOT_SENT / NOT_RUN when that is all there is). A study whose series no rule matched
says so, with each rule's first failing condition.

A path API request (``records.path_study``: a study row without series, holding path
jobs) is the state of its jobs: queued, running, failed (why), cancelled, or DELIVERED
once done (the mask went to the caller; nothing is sent to a PACS). It is never
RECEIVING: no series will ever arrive.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from db.models import Dispatch, Event, Job, Result, Series, Study
from dicom_node import waiting
from inference.path_api import is_path_job
from kernel.catalog import PipelineSpec
from kernel.vocabulary import (
    DELIVERED_STATES,
    UNDELIVERED_STATES,
    DeliveryStatus,
    DestinationState,
    EventKind,
    JobState,
    OutboxKind,
    OutboxState,
    SeriesState,
)

S = DeliveryStatus

# Words a radiologist reads at a glance, and the colour family of each status:
# ok (green): it is in the PACS; progress (blue): the node is working on it;
# attention (amber): a person should look; bad (red): it failed; neutral (grey): ended,
# nothing to deliver or deliberately not delivered.
LABELS: dict[DeliveryStatus, str] = {
    S.RECEIVING: "receiving",
    S.NO_RULE_MATCHED: "no rule matched",
    S.NO_ACTION: "no action",
    S.WAITING: "waiting for inputs",
    S.NOT_RUN: "not run",
    S.QUEUED: "queued",
    S.RUNNING: "running",
    S.HELD: "held for review",
    S.DELIVERY_PENDING: "delivery pending",
    S.DELIVERED: "delivered",
    S.DELIVERED_NO_FINDING: "delivered: no finding",
    S.NOT_SENT: "not sent",
    S.PARTIALLY_DELIVERED: "partially delivered",
    S.FAILED: "failed",
    S.CANCELLED: "cancelled",
    S.REJECTED: "rejected",
}
TONES: dict[DeliveryStatus, str] = {
    S.DELIVERED: "ok",
    S.DELIVERED_NO_FINDING: "ok",
    S.RECEIVING: "progress",
    S.QUEUED: "progress",
    S.RUNNING: "progress",
    S.WAITING: "progress",
    S.HELD: "attention",
    S.DELIVERY_PENDING: "attention",
    S.PARTIALLY_DELIVERED: "attention",
    S.NO_RULE_MATCHED: "attention",
    S.NOT_RUN: "neutral",
    S.FAILED: "bad",
    S.NOT_SENT: "neutral",
    S.CANCELLED: "neutral",
    S.REJECTED: "neutral",
    S.NO_ACTION: "neutral",
}
# Work in progress, most pressing first: the study shows the first one present.
_ACTIVE = (S.DELIVERY_PENDING, S.HELD, S.RUNNING, S.QUEUED, S.RECEIVING, S.WAITING)
# Ended without getting through, worst first.
_UNDELIVERED_ENDS = (S.FAILED, S.PARTIALLY_DELIVERED, S.REJECTED, S.CANCELLED)
# Ended as they should: delivered, or nothing to deliver (found nothing; its phase was never
# acquired). A pipeline that could not run for want of its phase does not make the study's
# other results "partial": it says so in the reason.
_GOOD_ENDS = (S.DELIVERED, S.DELIVERED_NO_FINDING, S.NOT_SENT, S.NOT_RUN)

Clock = Callable[[datetime], str]


def utc_clock(at: datetime) -> str:
    """The default way reasons name a time: ``10:32:05 UTC``."""
    return f"{at:%H:%M:%S} UTC"


@dataclass
class ItemStatus:
    """The status of one pipeline (``kind`` "pipeline") or forward ("forward")."""

    name: str
    kind: str
    status: DeliveryStatus
    reason: str = ""
    job_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": str(self.status),
            "label": LABELS[self.status],
            "tone": TONES[self.status],
            "reason": self.reason,
            "job_id": self.job_id,
        }


@dataclass
class StudyStatus:
    """A study's status, its reason, and the status of each pipeline and forward."""

    status: DeliveryStatus
    reason: str = ""
    items: list[ItemStatus] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.status]

    @property
    def tone(self) -> str:
        return TONES[self.status]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "label": self.label,
            "tone": self.tone,
            "reason": self.reason,
            "items": [i.as_dict() for i in self.items],
        }


# -- facts about a study, read in batches -------------------------------------------------


@dataclass
class _Send:
    """A group of outbox rows: of one result (``sop_uid``) or of forwards, to one
    destination, in one state; ``count`` rows, one of their errors and review notes."""

    sop_uid: str | None
    destination: str
    state: str
    count: int = 1
    last_error: str | None = None
    reviewed_by: str | None = None
    review_note: str | None = None


@dataclass
class _Facts:
    study: Study
    series: list[Any] = field(default_factory=list)  # rows of Series columns
    routed: dict[str, dict[str, Any]] = field(default_factory=dict)  # series UID -> data
    jobs: list[Any] = field(default_factory=list)  # rows of Job columns
    results: list[Any] = field(default_factory=list)  # rows of Result columns
    result_sends: list[_Send] = field(default_factory=list)
    forward_sends: list[_Send] = field(default_factory=list)
    settled: bool = False
    not_run: dict[str, str] = field(default_factory=dict)  # pipeline -> why


def _facts(s: Session, studies: list[Study], scope: Select | None = None) -> dict[int, _Facts]:
    """What the statuses of ``studies`` are derived from, in one query per table.

    ``scope``: a ``select(Study.id)`` naming the same studies; used instead of a list of
    ids when there are many (the dashboard's day), so the statements stay the same and
    cached. Plain rows, not ORM objects: only the columns needed are read.
    """
    facts = {st.id: _Facts(st) for st in studies}
    if not facts:
        return facts
    ids: Any = scope if scope is not None else list(facts)
    uids: Any = (
        select(Study.study_uid).where(Study.id.in_(scope))
        if scope is not None
        else [st.study_uid for st in studies]
    )
    by_uid = {st.study_uid: facts[st.id] for st in studies}
    for row in s.execute(
        select(
            Series.study_id,
            Series.series_uid,
            Series.state,
            Series.completed_at,
            Series.routed_at,
            Series.phase,
            Series.matched_rule,
        )
        .where(Series.study_id.in_(ids))
        .order_by(Series.id)
    ):
        if row.study_id in facts:
            facts[row.study_id].series.append(row)
    for row in s.execute(
        select(
            Job.id,
            Job.study_id,
            Job.pipeline,
            Job.inputs,
            Job.state,
            Job.attempts,
            Job.max_attempts,
            Job.last_error,
            Job.progress,
            Job.device,
            Job.summary,
        )
        .where(Job.study_id.in_(ids))
        .order_by(Job.id)
    ):
        if row.study_id in facts:
            facts[row.study_id].jobs.append(row)
    for row in s.execute(
        select(
            Result.study_id,
            Result.job_id,
            Result.sop_uid,
            Result.kind,
            Result.result_type,
            Result.superseded_at,
        )
        .where(Result.study_id.in_(ids))
        .order_by(Result.id)
    ):
        if row.study_id in facts:
            facts[row.study_id].results.append(row)
    # Result rows one by one (few per study); forwards counted per destination and state
    # (a forwarded study is hundreds of rows).
    for row in s.execute(
        select(
            Dispatch.study_id,
            Dispatch.sop_uid,
            Dispatch.destination,
            Dispatch.state,
            Dispatch.last_error,
            Dispatch.reviewed_by,
            Dispatch.review_note,
        ).where(Dispatch.study_id.in_(ids), Dispatch.kind == OutboxKind.RESULT)
    ):
        if row.study_id not in facts:
            continue
        facts[row.study_id].result_sends.append(
            _Send(
                row.sop_uid,
                row.destination,
                row.state,
                1,
                row.last_error,
                row.reviewed_by,
                row.review_note,
            )
        )
    for study_id, destination, state, count, error in s.execute(
        select(
            Dispatch.study_id,
            Dispatch.destination,
            Dispatch.state,
            func.count(),
            func.max(Dispatch.last_error),
        )
        .where(Dispatch.study_id.in_(ids), Dispatch.kind == OutboxKind.FORWARD)
        .group_by(Dispatch.study_id, Dispatch.destination, Dispatch.state)
    ):
        if study_id not in facts:
            continue
        facts[study_id].forward_sends.append(_Send(None, destination, state, count, error))
    for event in s.execute(
        select(Event.study_uid, Event.kind, Event.series_uid, Event.data, Event.at, Event.message)
        .where(
            Event.study_uid.in_(uids),
            Event.kind.in_((EventKind.ROUTED, EventKind.STUDY_SETTLED, EventKind.PIPELINE_NOT_RUN)),
        )
        .order_by(Event.id)
    ):
        f = by_uid.get(event.study_uid)
        if f is None:
            continue
        if event.kind == EventKind.ROUTED and event.series_uid:
            f.routed[event.series_uid] = event.data or {}
        elif event.kind == EventKind.STUDY_SETTLED:
            f.settled = event.at >= f.study.last_received_at
        elif event.kind == EventKind.PIPELINE_NOT_RUN:
            # "<pipeline>: not run: <why>" (``planning.PipelinePlan.not_run``); used when
            # the catalog in force no longer names the pipeline
            name, _, why = event.message.partition(":")
            why = why.strip().removeprefix("not run:").strip()
            if why.startswith("waiting ("):  # older events: "waiting (D needs D)"
                why = "its inputs never came before the study settled"
            f.not_run[name.strip()] = why
    return facts


# -- per item -----------------------------------------------------------------------------


def _health_reason(
    destination: str, health: Mapping[str, Any] | None, error: str | None, clock: Clock
) -> str:
    """Why a send to ``destination`` waits: it is unreachable, retrying, or on its way."""
    h = health.get(destination) if health else None
    if h is not None and h.state == DestinationState.UNREACHABLE:
        since = f" since {clock(h.since)}" if h.since else ""
        return f"{destination} unreachable{since}: {h.reason}"
    if error:
        return f"retrying {destination}: {error}"
    return f"on its way to {destination}"


def _deliveries(
    sends: list[_Send],
    health: Mapping[str, Any] | None,
    what: dict[str | None, str],
    clock: Clock,
) -> tuple[DeliveryStatus, str] | None:
    """The status of a group of deliveries (None when there are none).

    ``what``: SOP Instance UID -> how to name that result in a reason ("SEG", "RTSTRUCT").
    """
    live = [x for x in sends if x.state != OutboxState.SUPERSEDED]
    if not live:
        return None

    def named(x: _Send) -> str:
        return f"{what.get(x.sop_uid, '')} to {x.destination}".strip()

    pending = [x for x in live if x.state in UNDELIVERED_STATES]
    held = [x for x in live if x.state == OutboxState.HELD]
    delivered = [x for x in live if x.state in DELIVERED_STATES]
    failed = [x for x in live if x.state == OutboxState.FAILED]
    rejected = [x for x in live if x.state == OutboxState.REJECTED]
    if pending:
        reasons = []
        for destination in sorted({x.destination for x in pending}):
            errors = [
                x.last_error for x in pending if x.destination == destination and x.last_error
            ]
            reasons.append(_health_reason(destination, health, next(iter(errors), None), clock))
        return S.DELIVERY_PENDING, "; ".join(reasons)
    if held:
        return S.HELD, "waits for a reviewer: " + ", ".join(named(x) for x in held)
    bad = [f"{named(x)} failed: {x.last_error or 'refused'}" for x in failed] + [
        f"{named(x)} rejected by {x.reviewed_by}: {x.review_note}" for x in rejected
    ]
    if delivered and bad:
        good = ", ".join(sorted({named(x) for x in delivered}))
        return S.PARTIALLY_DELIVERED, f"delivered {good}; " + "; ".join(bad)
    if failed:
        return S.FAILED, "; ".join(bad)
    if rejected:
        return S.REJECTED, "; ".join(bad)
    return S.DELIVERED, ", ".join(sorted({named(x) for x in delivered}))


def _job_item(
    name: str,
    job: Any,
    results: list[Any],
    sends: list[_Send],
    health: Mapping[str, Any] | None,
    clock: Clock,
) -> ItemStatus:
    item = ItemStatus(name, "pipeline", S.QUEUED, job_id=job.id)
    state = job.state
    if state == JobState.QUEUED:
        item.status = S.QUEUED
        item.reason = (
            f"retry {job.attempts + 1} of {job.max_attempts} after: {job.last_error}"
            if job.attempts and job.last_error
            else "waits for a worker"
        )
    elif state == JobState.RUNNING:
        item.status, item.reason = S.RUNNING, f"{round(job.progress * 100)} % on {job.device}"
    elif state == JobState.CANCELLING:
        item.status, item.reason = S.RUNNING, "cancelling"
    elif state == JobState.FAILED:
        item.status, item.reason = S.FAILED, job.last_error or "failed"
    elif state == JobState.EXPIRED:
        item.status, item.reason = S.FAILED, "expired: waited too long in the queue, never ran"
    elif state == JobState.CANCELLED:
        item.status, item.reason = S.CANCELLED, "cancelled by a user"
    else:  # done: what became of its results
        current = [r for r in results if r.job_id == job.id and r.superseded_at is None]
        empty = bool((job.summary or {}).get("empty"))
        if not current:
            item.status = S.NOT_SENT
            item.reason = (
                "found nothing; nothing sent (empty_result: skip)"
                if empty
                else "no destination to send the result to"
            )
            return item
        kinds = {
            r.sop_uid: r.result_type if r.result_type == "RTSTRUCT" else r.kind for r in current
        }
        mine = [x for x in sends if x.sop_uid in kinds]
        judged = _deliveries(mine, health, kinds, clock)
        if judged is None:
            item.status, item.reason = S.NOT_SENT, "no destination to send the result to"
            return item
        item.status, item.reason = judged
        if item.status == S.DELIVERED and empty:
            item.status = S.DELIVERED_NO_FINDING
            item.reason = "found nothing; 'no finding' object delivered: " + item.reason
    return item


def _waiting_for(
    name: str,
    f: _Facts,
    pipelines: Mapping[str, PipelineSpec] | None,
    clock: Clock,
    study_timeout_s: float | None,
) -> str:
    """Which inputs a pipeline without a job still needs (from the series' phases), and
    when the wait ends (``dicom_node.waiting``); once the study settled, why it never ran."""
    spec = (pipelines or {}).get(name)
    settles_at = None
    last = getattr(f.study, "last_received_at", None)
    if study_timeout_s is not None and last is not None:
        settles_at = clock(last + timedelta(seconds=study_timeout_s))
    if spec is None:
        if f.settled:
            return "its inputs never came before the study settled"
        return waiting.runs_when_settled(["its inputs are not complete yet"], settles_at)
    fed = [
        x
        for x in f.series
        if name in (f.routed.get(x.series_uid) or {}).get("pipelines", [])
        and not (f.routed.get(x.series_uid) or {}).get("discard")
    ]
    phases = {x.phase for x in fed}
    missing: dict[str, list[str]] = {}
    fallbacks = []
    for role, wanted in spec.inputs.items():
        if wanted[0] in phases:
            continue
        used = next((p for p in wanted if p in phases), None)
        if used is not None:
            fallbacks.append(waiting.fallback(role, wanted, used))
        else:
            missing[role] = list(wanted)
    if missing and f.settled:
        return waiting.never_came(missing)
    if missing:
        arrived = {x.phase for x in f.series if x.phase}
        return waiting.missing(name, missing, arrived, settles_at, study_timeout_s)
    if f.settled:  # runnable, but no job: the settle found it otherwise
        return "its inputs were not complete when the study settled"
    why = fallbacks or ["inputs may be incomplete"]
    return waiting.runs_when_settled(why, settles_at, study_timeout_s)


def _study_status(
    f: _Facts,
    health: Mapping[str, Any] | None,
    pipelines: Mapping[str, PipelineSpec] | None,
    clock: Clock,
    study_timeout_s: float | None = None,
) -> StudyStatus:
    items: list[ItemStatus] = []
    requested: list[str] = []
    for x in f.series:
        data = f.routed.get(x.series_uid) or {}
        if data.get("discard"):
            continue
        requested += [p for p in data.get("pipelines", []) if p not in requested]
    latest: dict[str, Any] = {}
    path_jobs: dict[str, Any] = {}
    for job in f.jobs:
        if is_path_job(job.inputs or {}):
            path_jobs[job.pipeline] = job  # not part of the study's routing
            continue
        latest[job.pipeline] = job  # jobs come in id order: the last one wins
        if job.pipeline not in requested:
            requested.append(job.pipeline)
    if path_jobs and not f.series:
        # A path API request: no series ever arrives; it is its jobs' state.
        items = [_path_job_item(name, job, clock) for name, job in path_jobs.items()]
        return _combined(f, items, [])
    for name in requested:
        job = latest.get(name)
        if job is not None:
            items.append(_job_item(name, job, f.results, f.result_sends, health, clock))
        elif f.settled:
            why = _waiting_for(name, f, pipelines, clock, study_timeout_s)
            if pipelines is None or name not in pipelines:
                why = f.not_run.get(name) or why
            items.append(ItemStatus(name, "pipeline", S.NOT_RUN, why))
        else:
            why = _waiting_for(name, f, pipelines, clock, study_timeout_s)
            items.append(ItemStatus(name, "pipeline", S.WAITING, why))
    by_destination: dict[str, list[_Send]] = defaultdict(list)
    for x in f.forward_sends:
        by_destination[x.destination].append(x)
    for destination, sends in sorted(by_destination.items()):
        judged = _deliveries(sends, health, {None: "originals"}, clock)
        if judged is not None:
            count = sum(x.count for x in sends if x.state != OutboxState.SUPERSEDED)
            status, reason = judged
            items.append(
                ItemStatus(
                    f"forward to {destination}", "forward", status, f"{count} instances: {reason}"
                )
            )

    receiving = [
        x
        for x in f.series
        if x.state == SeriesState.RECEIVING
        or x.routed_at is None
        or (x.completed_at is not None and x.routed_at < x.completed_at)
    ]
    return _combined(f, items, receiving)


def _path_job_item(name: str, job: Any, clock: Clock) -> ItemStatus:
    """A path API job (``inference.path_api``): queued, running, failed, cancelled and
    expired as any job; done is DELIVERED, its mask handed to the caller (it sends
    nothing to a PACS), or FAILED when it finished without a mask."""
    if job.state != JobState.DONE:
        return _job_item(name, job, [], [], None, clock)
    mask = (job.summary or {}).get("mask_path")
    if not mask:
        return ItemStatus(name, "pipeline", S.FAILED, "finished without a mask", job.id)
    return ItemStatus(
        name,
        "pipeline",
        S.DELIVERED,
        f"path API: mask written to {mask} (nothing is sent to a PACS)",
        job.id,
    )


def _combined(f: _Facts, items: list[ItemStatus], receiving: list[Any]) -> StudyStatus:
    """The study's status from its items and its series still arriving."""
    present = {i.status for i in items}
    if receiving:
        present.add(S.RECEIVING)
    failed = [i for i in items if i.status == S.FAILED]
    if failed and present & set(_ACTIVE):
        # A failure for good needs someone now: it is not hidden behind work still in
        # progress (a pipeline waiting up to study_timeout_s for its phase, say).
        active = [i for i in items if i.status in _ACTIVE]
        still = ", ".join(f"{i.name} {LABELS[i.status]}" for i in active)
        if receiving:
            still = ", ".join(filter(None, [f"{len(receiving)} series arriving", still]))
        return StudyStatus(S.FAILED, f"{_reasons(items, S.FAILED)} (still: {still})", items)
    for status in _ACTIVE:
        if status in present:
            if status == S.RECEIVING:
                return StudyStatus(status, f"{len(receiving)} series arriving", items)
            return StudyStatus(status, _reasons(items, status), items)
    if not f.series and not items:
        return StudyStatus(S.RECEIVING, "no series yet", items)
    if not items:
        return _no_items(f, items)
    delivered = present & {S.DELIVERED, S.DELIVERED_NO_FINDING}
    if present <= set(_GOOD_ENDS):
        for status in _GOOD_ENDS:  # the best that happened names the study
            if status in present:
                return StudyStatus(status, _reasons(items, *present), items)
    if delivered:
        bad = [i for i in items if i.status not in _GOOD_ENDS]
        reason = "; ".join(f"{i.name} {LABELS[i.status]}: {i.reason}" for i in bad)
        return StudyStatus(S.PARTIALLY_DELIVERED, reason, items)
    for status in _UNDELIVERED_ENDS:
        if status in present:
            return StudyStatus(status, _reasons(items, status), items)
    return StudyStatus(S.NOT_SENT, _reasons(items, *present), items)


def _reasons(items: list[ItemStatus], *statuses: DeliveryStatus) -> str:
    chosen = [i for i in items if i.status in statuses]
    if len(chosen) == 1:
        return f"{chosen[0].name}: {chosen[0].reason}" if chosen[0].reason else chosen[0].name
    return "; ".join(f"{i.name}: {i.reason}" if i.reason else i.name for i in chosen)


def _no_items(f: _Facts, items: list[ItemStatus]) -> StudyStatus:
    """Every series routed, nothing asked for: no rule matched, or rules without action."""
    matched = [
        x
        for x in f.series
        if (f.routed.get(x.series_uid) or {}).get("matched_rules") or x.matched_rule
    ]
    if matched:
        rules = sorted({r for x in matched for r in (x.matched_rule or "").split(", ") if r})
        return StudyStatus(S.NO_ACTION, f"rule {', '.join(rules)} asks for nothing", items)
    failures: list[tuple[str, str]] = []
    for x in f.series:
        for entry in (f.routed.get(x.series_uid) or {}).get("not_matched", []):
            if isinstance(entry, dict):
                pair = (str(entry.get("rule")), str(entry.get("failure")))
                if pair not in failures:
                    failures.append(pair)
    if len({rule for rule, _ in failures}) == 1:
        reason = "; ".join(failure for _, failure in failures)
    else:
        reason = "; ".join(f"{rule}: {failure}" for rule, failure in failures)
    return StudyStatus(S.NO_RULE_MATCHED, reason or "the rules file has no rules", items)


# -- public -------------------------------------------------------------------------------


def study_statuses(
    s: Session,
    studies: Iterable[Study],
    health: Mapping[str, Any] | None = None,
    pipelines: Mapping[str, PipelineSpec] | None = None,
    clock: Clock = utc_clock,
    scope: Select | None = None,
    study_timeout_s: float | None = None,
) -> dict[int, StudyStatus]:
    """Study id -> its status, for many studies with a handful of queries.

    ``health``: destination name -> ``health.DestinationHealth`` (why a delivery waits);
    ``pipelines``: the catalog in force (which input a waiting pipeline needs);
    ``clock``: how reasons name a time (the pages pass the node's time zone);
    ``scope``: ``select(Study.id)`` of the same studies, for many of them. A study may be
    a ``Study`` or a row with its ``id``, ``study_uid`` and ``last_received_at``;
    ``study_timeout_s``: the rules' (when a study waiting for an input settles).
    """
    facts = _facts(s, list(studies), scope)
    return {
        sid: _study_status(f, health, pipelines, clock, study_timeout_s) for sid, f in facts.items()
    }


def _has(model: Any, *conditions: Any) -> Any:
    return exists().where(model.study_id == Study.id, *conditions)


def candidates(status: DeliveryStatus) -> Any | None:
    """A SQL condition on ``Study`` that every study in ``status`` meets: a necessary one,
    to narrow a search before the statuses are derived (the derivation above decides).
    None where there is no such shortcut (waiting for inputs, not run)."""
    # A path API request (no series, path jobs) is delivered once its job is done.
    delivered = or_(
        _has(Dispatch, Dispatch.state.in_(DELIVERED_STATES)),
        and_(~_has(Series), _has(Job, Job.state == JobState.DONE)),
    )
    conditions: dict[DeliveryStatus, Any] = {
        S.FAILED: or_(
            _has(Job, Job.state.in_((JobState.FAILED, JobState.EXPIRED))),
            _has(Dispatch, Dispatch.state == OutboxState.FAILED),
        ),
        S.PARTIALLY_DELIVERED: delivered,
        S.DELIVERED: delivered,
        S.DELIVERED_NO_FINDING: delivered,
        S.NOT_SENT: _has(Job, Job.state == JobState.DONE),
        S.HELD: _has(Dispatch, Dispatch.state == OutboxState.HELD),
        S.DELIVERY_PENDING: _has(Dispatch, Dispatch.state.in_(UNDELIVERED_STATES)),
        S.QUEUED: _has(Job, Job.state == JobState.QUEUED),
        S.RUNNING: _has(Job, Job.state.in_((JobState.RUNNING, JobState.CANCELLING))),
        S.CANCELLED: _has(Job, Job.state == JobState.CANCELLED),
        S.REJECTED: _has(Dispatch, Dispatch.state == OutboxState.REJECTED),
        S.RECEIVING: or_(
            and_(~_has(Series), ~_has(Job)),  # without series but with a job: path API
            _has(
                Series,
                or_(
                    Series.state == SeriesState.RECEIVING,
                    Series.routed_at.is_(None),
                    Series.routed_at < Series.completed_at,
                ),
            ),
        ),
        S.NO_RULE_MATCHED: and_(~_has(Job), ~_has(Dispatch)),
        S.NO_ACTION: and_(~_has(Job), ~_has(Dispatch)),
    }
    return conditions.get(status)


def study_status(
    s: Session,
    study: Study,
    health: Mapping[str, Any] | None = None,
    pipelines: Mapping[str, PipelineSpec] | None = None,
    clock: Clock = utc_clock,
    study_timeout_s: float | None = None,
) -> StudyStatus:
    """The status of one study (see ``study_statuses``)."""
    found = study_statuses(s, [study], health, pipelines, clock, study_timeout_s=study_timeout_s)
    return found[study.id]


def recent_counts(
    s: Session,
    since: datetime,
    health: Mapping[str, Any] | None = None,
    pipelines: Mapping[str, PipelineSpec] | None = None,
) -> dict[DeliveryStatus, int]:
    """How many studies first received since ``since`` are in each status."""
    scope = select(Study.id).where(Study.first_received_at >= since)
    studies = s.execute(
        select(Study.id, Study.study_uid, Study.last_received_at).where(Study.id.in_(scope))
    ).all()
    counts = dict.fromkeys(DeliveryStatus, 0)
    for status in study_statuses(s, studies, health, pipelines, scope=scope).values():
        counts[status.status] += 1
    return counts
