"""Routing a completed series: read its attributes, apply the rules, act on the decision.

Actions go to the database only (jobs for pipelines, dispatch rows for forwarding), so
the next stages pick them up and every decision stays explainable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from db.models import Event, Instance, Job, Series, Study, utcnow
from db.session import Database
from dicom_node import image_evidence, records, retrieve, series_attrs
from dicom_node.planning import PipelinePlan, SeriesPlan, plan_study
from dicom_node.rules import RoutingDecision, RuleSet
from dicom_node.series_attrs import InstanceRow
from inference.queue import enqueue
from kernel import outbox
from kernel.events import add_event
from kernel.vocabulary import EventKind, EventLevel, OutboxKind, Priority, SeriesState

log = logging.getLogger("dicom_node.routing")


def series_attributes(series: Series, rows: list[InstanceRow]) -> dict[str, Any]:
    """What rules see of a received series: its main stack's attributes and its origin."""
    attrs = series_attrs.from_rows(rows)
    attrs.update(
        CallingAE=series.calling_ae,
        CalledAE=series.called_ae,
        SourceAddress=series.source_address,
    )
    return attrs


class Router:
    """Routes completed series and fires study-level pipelines when their inputs exist."""

    def __init__(
        self,
        db: Database,
        rules: Callable[[], RuleSet],
        max_attempts: int = 3,
        target_spacing_mm: Callable[[str], float | None] | None = None,
    ) -> None:
        self.db = db
        self.rules = rules
        self.max_attempts = max_attempts
        # pipeline -> the slice spacing its first model works at (input preference)
        self.target_spacing_mm = target_spacing_mm
        self._attrs: dict[str, dict[str, Any]] = {}  # series UID + completion -> attributes

    # -- reading the study -----------------------------------------------------------
    def _complete_series(self, s: Session, study: Study) -> dict[str, dict[str, Any]]:
        """Attributes of the study's complete series (one header read per completion)."""
        out: dict[str, dict[str, Any]] = {}
        for series in s.scalars(
            select(Series).where(
                Series.study_id == study.id, Series.state == SeriesState.COMPLETE
            )
        ):
            key = f"{series.series_uid}:{series.instance_count}:{series.completed_at}"
            if key not in self._attrs:
                rows = [
                    InstanceRow(*row)
                    for row in s.execute(
                        select(
                            Instance.path,
                            Instance.stack_key,
                            Instance.slice_position_mm,
                            Instance.acquisition_number,
                            Instance.instance_number,
                        )
                        .where(Instance.series_id == series.id)
                        .order_by(Instance.id)
                    )
                ]
                if not rows:
                    continue
                self._attrs[key] = series_attributes(series, rows)
            out[series.series_uid] = self._attrs[key]
        return out

    def _plan(
        self, s: Session, study: Study, ruleset: RuleSet
    ) -> tuple[dict[str, SeriesPlan], dict[str, PipelinePlan]]:
        series_plans, pipeline_plans = plan_study(
            ruleset,
            self._complete_series(s, study),
            self.target_spacing_mm,
            lambda uid: image_evidence.lookup_in(s, uid),
            retrieve.named_pipelines(s, study.study_uid),
        )
        evidence = ruleset.spec.phases.image_evidence
        for plan in series_plans.values():
            if plan.image_missing and evidence.model:
                image_evidence.request(s, study, plan.series_uid, evidence, self.max_attempts)
        for plan in series_plans.values():
            row = s.scalars(select(Series).where(Series.series_uid == plan.series_uid)).one()
            records.record_routing(
                s,
                row,
                phase=plan.phase.phase,
                confidence=plan.phase.confidence,
                reasons=plan.phase.reasons,
                matched_rules=plan.decision.matched_rules,
            )
        return series_plans, pipeline_plans

    # -- events ----------------------------------------------------------------------
    def route_series(self, series_uid: str) -> RoutingDecision:
        """A series completed: classify the study, act on this series, fire pipelines."""
        # Rules are read before the write transaction opens: a reload records an event in
        # its own session, which SQLite would make wait on this one's lock.
        ruleset = self.rules()
        with self.db.session() as s:
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
            study = series.study
            series_plans, pipeline_plans = self._plan(s, study, ruleset)
            plan = series_plans[series_uid]
            decision = plan.decision
            records.mark_routed(series)
            phase = plan.phase
            add_event(
                s,
                EventKind.CLASSIFIED,
                f"phase {phase.phase} ({phase.confidence:.2f}): " + "; ".join(phase.reasons),
                study_uid=study.study_uid,
                series_uid=series_uid,
                data=phase.as_dict(),
            )
            add_event(
                s,
                EventKind.ROUTED,
                decision.summary(),  # or why no rule matched: each rule's first failure
                study_uid=study.study_uid,
                series_uid=series_uid,
                data={
                    "pipelines": decision.pipelines,
                    "forward": decision.forward,
                    "discard": decision.discard,
                    "matched_rules": decision.matched_rules,
                    "not_matched": [
                        {"rule": rule, "failure": failure}
                        for rule, failure in decision.rule_failures
                    ],
                },
            )
            if plan.left_out:
                add_event(
                    s,
                    EventKind.STACKS_LEFT_OUT,
                    f"classified and segmented on its main stack ({plan.instance_count} "
                    f"{plan.image_kind} {plan.orientation or ''} images); left out: "
                    + "; ".join(plan.left_out),
                    level=EventLevel.WARNING,
                    study_uid=study.study_uid,
                    series_uid=series_uid,
                    data={"left_out": plan.left_out},
                )
            if plan.incomplete and decision.pipelines and not decision.discard:
                add_event(
                    s,
                    EventKind.SERIES_INCOMPLETE,
                    "; ".join(plan.incomplete)
                    + f": its pipelines wait until the study settles "
                    f"({ruleset.spec.study_timeout_s:g} s without new instances)",
                    level=EventLevel.WARNING,
                    study_uid=study.study_uid,
                    series_uid=series_uid,
                )
            if not decision.discard:
                instances = s.scalars(
                    select(Instance).where(Instance.series_id == series.id).order_by(Instance.id)
                ).all()
                objects = [(i.sop_uid, i.sop_class_uid, i.path) for i in instances]
                for destination in decision.forward:
                    outbox.queue_many(
                        s,
                        study_id=study.id,
                        kind=OutboxKind.FORWARD,
                        objects=objects,
                        destination=destination,
                    )
            for pipeline_plan in pipeline_plans.values():
                if pipeline_plan.ready:
                    self._fire(s, study, pipeline_plan, series_plans, ruleset)
        return decision

    def poll_image_evidence(self) -> list[str]:
        """Route again the series whose image evidence arrived (or failed) since they were
        last routed; returns their UIDs."""
        with self.db.session() as s:
            due = image_evidence.arrived_since_routing(s)
        for series_uid in due:
            self.route_series(series_uid)
        return due

    def poll_settled(self, now: datetime | None = None) -> list[str]:
        """Studies quiet for study_timeout_s: run on fallbacks or record why not."""
        ruleset = self.rules()
        now = now or utcnow()
        cutoff = now - timedelta(seconds=ruleset.spec.study_timeout_s)
        settled: list[str] = []
        with self.db.session() as s:
            studies = s.scalars(
                select(Study).where(
                    Study.last_received_at <= cutoff,
                    Study.last_received_at >= cutoff - timedelta(days=7),
                    ~exists().where(
                        Event.study_uid == Study.study_uid,
                        Event.kind == EventKind.STUDY_SETTLED,
                        Event.at >= Study.last_received_at,
                    ),
                )
            ).all()
            for study in studies:
                if s.scalars(
                    select(Series).where(
                        Series.study_id == study.id, Series.state != SeriesState.COMPLETE
                    )
                ).first():
                    continue  # still receiving: the assembler completes it first
                series_plans, pipeline_plans = self._plan(s, study, ruleset)
                notes = []
                for plan in pipeline_plans.values():
                    if plan.runnable:
                        self._fire(s, study, plan, series_plans, ruleset)
                    else:
                        notes.append(plan.not_run())
                        add_event(
                            s,
                            EventKind.PIPELINE_NOT_RUN,
                            plan.not_run(),
                            level=EventLevel.WARNING,
                            study_uid=study.study_uid,
                        )
                records.set_study_note(study, "; ".join(notes))
                add_event(
                    s,
                    EventKind.STUDY_SETTLED,
                    f"no instance for {ruleset.spec.study_timeout_s:g} s",
                    study_uid=study.study_uid,
                )
                settled.append(study.study_uid)
        return settled

    # -- actions ---------------------------------------------------------------------
    def _fire(
        self,
        s: Session,
        study: Study,
        plan: PipelinePlan,
        series_plans: dict[str, SeriesPlan],
        ruleset: RuleSet,
    ) -> Job | None:
        """Queue the pipeline once per study and input set (again if an input changed)."""
        inputs_completed = max(
            s.scalars(
                select(Series.completed_at).where(Series.series_uid.in_(plan.inputs.values()))
            )
        )
        spec = ruleset.pipelines[plan.pipeline]
        urgent = any(
            series_plans[uid].decision.priority == Priority.URGENT
            for uid in plan.inputs.values()
        )
        return enqueue(
            s,
            study,
            plan.pipeline,
            plan.inputs,
            priority=Priority.URGENT if urgent else spec.priority,
            max_attempts=self.max_attempts,
            inputs_ready_at=inputs_completed,
            reason="; ".join(f"{role} <- {why}" for role, why in plan.choices.items()),
            update_urls=[spec.update_url] if spec.update_url else None,
        )
