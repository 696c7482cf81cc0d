"""A study's timeline as runs: each pipeline run's events in order, with totals.

A run is one job from the moment it was queued (by routing, or again by a user) to its
last delivery; automatic retries, resends, reviews and storage commitment are rows of the
run they belong to. The first run of a job also shows what led to it: the study's first
instance, and the completion, classification and routing of its input series. Rows are
in time order, so a step is never negative; each run has its own total.

The summary stepper (received -> complete -> classified -> queued -> inferred -> sent)
is taken from the latest run of each pipeline, so a retry or resend never mixes runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from db.models import Dispatch, Event, Job, Result, Series, Study
from kernel.vocabulary import DELIVERED_STATES, EventKind, JobState, OutboxKind

STEP_NAMES: dict[str, str] = {
    EventKind.STUDY_RECEIVED: "received",
    EventKind.SERIES_COMPLETE: "series complete",
    EventKind.SERIES_REOPENED: "series re-opened",
    EventKind.CLASSIFIED: "classified",
    EventKind.ROUTED: "routed",
    EventKind.STACKS_LEFT_OUT: "images left out",
    EventKind.SERIES_INCOMPLETE: "series may be incomplete",
    EventKind.JOB_QUEUED: "queued",
    EventKind.JOB_STARTED: "started",
    EventKind.JOB_RETRY: "retry",
    EventKind.JOB_FAILED: "failed",
    EventKind.JOB_REQUEUED: "requeued",
    EventKind.JOB_EXPIRED: "expired",
    EventKind.JOB_CANCEL: "cancel",
    EventKind.JOB_PRIORITY: "priority",
    EventKind.JOB_DONE: "inferred",
    EventKind.RESULT_WRITTEN: "result written",
    EventKind.RESULT_EMPTY: "nothing found",
    EventKind.RESULT_TRANSCODED: "result transcoded",
    EventKind.RESULT_SUPERSEDED: "result superseded",
    EventKind.RESULT_HELD: "held for review",
    EventKind.RESULT_APPROVED: "approved",
    EventKind.RESULT_REJECTED: "rejected",
    EventKind.SENT: "sent",
    EventKind.SEND_RETRY: "send retry",
    EventKind.SEND_FAILED: "send failed",
    EventKind.RESEND: "resend",
    EventKind.COMMITTED: "committed",
    EventKind.COMMIT_FAILED: "commit failed",
    EventKind.WEBHOOK_SENT: "webhook sent",
    EventKind.WEBHOOK_RETRY: "webhook retry",
    EventKind.WEBHOOK_FAILED: "webhook failed",
}
# What led to a job: shown at the start of its first run.
_LEAD_UP = (
    EventKind.SERIES_COMPLETE,
    EventKind.CLASSIFIED,
    EventKind.ROUTED,
    EventKind.STACKS_LEFT_OUT,
    EventKind.SERIES_INCOMPLETE,
)


@dataclass
class Row:
    at: datetime
    step: str
    message: str
    level: str
    after_s: float | None = None


@dataclass
class Run:
    """One run of one job: its rows in time order and its total (first to last row)."""

    job_id: int
    pipeline: str
    number: int  # 1 for the first run of the job, 2 after a user queued it again, ...
    rows: list[Row] = field(default_factory=list)

    @property
    def total_s(self) -> float | None:
        if len(self.rows) < 2:
            return None
        return (self.rows[-1].at - self.rows[0].at).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "pipeline": self.pipeline,
            "run": self.number,
            "total_s": self.total_s,
            "rows": [
                {
                    "at": r.at.isoformat(),
                    "step": r.step,
                    "message": r.message,
                    "level": r.level,
                    "after_s": r.after_s,
                }
                for r in self.rows
            ],
        }


def _starts_run(event: Event) -> bool:
    if event.kind == EventKind.JOB_QUEUED:
        return True
    return event.kind == EventKind.JOB_RETRY and bool((event.data or {}).get("requeued_by"))


def runs(study: Study, jobs: list[Job], events: list[Event]) -> list[Run]:
    """The runs of every job of the study, oldest first (``events`` in any order)."""
    ordered = sorted(events, key=lambda e: (e.at, e.id))
    received = next((e for e in ordered if e.kind == EventKind.STUDY_RECEIVED), None)
    out: list[Run] = []
    for job in jobs:
        mine = [e for e in ordered if e.job_id == job.id]
        job_runs: list[Run] = []
        for event in mine:
            if _starts_run(event) or not job_runs:
                job_runs.append(Run(job.id, job.pipeline, len(job_runs) + 1))
            job_runs[-1].rows.append(_row(event))
        if not job_runs:
            continue
        first = job_runs[0]
        inputs = {str(v) for v in (job.inputs or {}).values() if isinstance(v, str)}
        start = first.rows[0].at
        last_pass: dict[tuple[str, str | None], Event] = {}
        for e in ordered:  # a series completed again (it grew): its last pass counts
            if e.kind in _LEAD_UP and e.series_uid in inputs and e.at <= start:
                last_pass[(e.kind, e.series_uid)] = e
        lead_up = [_row(e) for e in sorted(last_pass.values(), key=lambda e: (e.at, e.id))]
        if received is not None and received.at <= start:
            lead_up.insert(0, _row(received))
        first.rows[:0] = lead_up
        for run in job_runs:
            run.rows.sort(key=lambda r: r.at)
            for previous, row in zip(run.rows, run.rows[1:], strict=False):
                row.after_s = (row.at - previous.at).total_seconds()
        out += job_runs
    out.sort(key=lambda r: (r.rows[0].at, r.job_id, r.number))
    return out


def _row(event: Event) -> Row:
    return Row(event.at, STEP_NAMES.get(event.kind, event.kind), event.message, event.level)


def summary(
    study: Study,
    series: list[Series],
    jobs: list[Job],
    results: list[Result],
    sends: list[Dispatch],
) -> list[dict[str, Any]]:
    """The six milestones of the study's latest runs, each with the time since the one
    before (None when it did not happen, or happened before it: never negative)."""
    latest: dict[str, Job] = {}
    for job in jobs:
        latest[job.pipeline] = job
    current = list(latest.values())
    inputs = {str(v) for j in current for v in (j.inputs or {}).values() if isinstance(v, str)}
    fed = [x for x in series if x.series_uid in inputs] or series
    job_ids = {j.id for j in current}
    sop_uids = {r.sop_uid for r in results if r.job_id in job_ids and r.superseded_at is None}
    queued = [j.queued_at for j in current if j.queued_at]
    steps = [
        ("received", study.first_received_at),
        ("complete", _max(x.completed_at for x in fed)),
        ("classified", _max(x.routed_at for x in fed)),
        ("queued", max(queued) if queued else None),  # every pipeline queued by then
        ("inferred", _max(j.finished_at for j in current if j.state == JobState.DONE)),
        (
            "sent",
            _max(
                d.sent_at
                for d in sends
                if d.kind == OutboxKind.RESULT
                and d.sop_uid in sop_uids
                and d.state in DELIVERED_STATES
            ),
        ),
    ]
    out = []
    previous: datetime | None = None
    for name, at in steps:
        after = (at - previous).total_seconds() if at and previous else None
        if after is not None and after < 0:
            after = None  # happened before the step it follows: no step to show
        out.append({"step": name, "at": at, "after_s": after})
        previous = at or previous
    return out


def _max(values: Any) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
