"""Prometheus metrics: one registry per app, gauges computed from the database at scrape.

The database already records every instance, job and send, so most series are read from
it when Prometheus scrapes (nothing to lose on restart, no hooks in the stages). Only
associations leave no row; the listener counts them and the service view reports it.

Alerting: ``dicom_node_degraded`` is 1 when ``/healthz`` says degraded (the same checks),
``dicom_node_destination_up`` 0 for a destination that does not answer, and
``dicom_node_studies_recent{status}`` counts the last day's studies by the status the
pages show (``dicom_node.status``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from db.models import Dispatch, Event, Instance, Job, Series, utcnow
from dicom_node import status as statuses
from dicom_node.view import ServiceView
from dicom_node.web.checks import run_checks
from kernel.vocabulary import DeliveryStatus, DestinationState, EventKind, JobState, OutboxState

JOB_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class NodeCollector:
    """Reads the node's counts from its database at every scrape."""

    def __init__(self, node: ServiceView) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        with node.db.session() as s:
            instances = s.scalar(select(func.coalesce(func.sum(Instance.receive_count), 0)))
            phases = s.execute(
                select(Series.phase, func.count())
                .where(Series.modality != "SEG")
                .group_by(Series.phase)
            ).all()
            jobs = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            sends = s.execute(select(Dispatch.state, func.count()).group_by(Dispatch.state)).all()
            retries = s.scalar(select(func.count()).where(Event.kind == EventKind.SEND_RETRY))
            spans = s.execute(
                select(Job.started_at, Job.finished_at).where(
                    Job.state == JobState.DONE,
                    Job.started_at.is_not(None),
                    Job.finished_at.is_not(None),
                )
            ).all()
        c = CounterMetricFamily(
            "dicom_node_instances_received", "DICOM instances received (re-sends included)"
        )
        c.add_metric([], float(instances or 0))
        yield c
        assoc = node.associations_requested()
        c = CounterMetricFamily("dicom_node_associations", "DICOM associations requested")
        c.add_metric([], float(assoc))
        yield c
        g = GaugeMetricFamily("dicom_node_series", "Series by contrast phase", labels=["phase"])
        for phase, n in phases:
            g.add_metric([phase or "unclassified"], n)
        yield g
        g = GaugeMetricFamily("dicom_node_jobs", "Jobs by state", labels=["state"])
        states = dict(jobs)
        for state in JobState:
            g.add_metric([str(state)], states.get(state, 0))
        yield g
        g = GaugeMetricFamily("dicom_node_queue_depth", "Jobs waiting to run")
        g.add_metric([], states.get(JobState.QUEUED, 0))
        yield g
        c = CounterMetricFamily("dicom_node_sends", "Outbox rows by outcome", labels=["outcome"])
        outcomes = dict(sends)
        for state in OutboxState:
            c.add_metric([str(state)], outcomes.get(state, 0))
        c.add_metric(["retry"], retries or 0)
        yield c
        yield _job_histogram([(b - a).total_seconds() for a, b in spans])
        yield from self._health()

    def _health(self) -> Iterator[Metric]:
        node = self.node
        checks = run_checks(node)
        g = GaugeMetricFamily(
            "dicom_node_degraded", "1 when /healthz reports degraded (see its reasons)"
        )
        g.add_metric([], 1.0 if checks.degraded else 0.0)
        yield g
        g = GaugeMetricFamily("dicom_node_ready", "1 when /readyz answers 200")
        g.add_metric([], 1.0 if checks.ready else 0.0)
        yield g
        up = GaugeMetricFamily(
            "dicom_node_destination_up",
            "0 when the destination's latest send or C-ECHO got no answer",
            labels=["destination"],
        )
        waiting = GaugeMetricFamily(
            "dicom_node_destination_undelivered",
            "Outbox rows waiting to be delivered to the destination",
            labels=["destination"],
        )
        held = GaugeMetricFamily(
            "dicom_node_destination_held",
            "Outbox rows held for review for the destination",
            labels=["destination"],
        )
        for name, h in checks.destinations.items():
            up.add_metric([name], 0.0 if h.state == DestinationState.UNREACHABLE else 1.0)
            waiting.add_metric([name], h.pending)
            held.add_metric([name], h.held)
        yield up
        yield waiting
        yield held
        rules = node.rules.get() if node.rules is not None else None
        with node.db.session() as s:
            counts = statuses.recent_counts(
                s,
                utcnow() - timedelta(days=1),
                checks.destinations,
                rules.pipelines if rules is not None else None,
            )
        g = GaugeMetricFamily(
            "dicom_node_studies_recent",
            "Studies first received in the last 24 h, by status",
            labels=["status"],
        )
        for status in DeliveryStatus:
            g.add_metric([str(status)], counts.get(status, 0))
        yield g


def _job_histogram(durations: list[float]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    for edge in JOB_SECONDS_BUCKETS:
        buckets.append((f"{edge:g}", float(sum(1 for d in durations if d <= edge))))
    buckets.append(("+Inf", float(len(durations))))
    h = HistogramMetricFamily("dicom_node_job_duration_seconds", "Run time of finished jobs")
    h.add_metric([], buckets, sum_value=sum(durations))
    return h


def make_registry(node: ServiceView) -> CollectorRegistry:
    """A registry of this node only (several nodes may run in one test process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry
