"""Prometheus metrics: one registry per app, gauges computed from the database at scrape.

The database already records every instance, job and send, so most series are read from
it when Prometheus scrapes (nothing to lose on restart, no hooks in the stages). Only
associations leave no row; the listener counts them and the service view reports it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from db.models import Dispatch, Event, Instance, Job, Series
from dicom_node.view import ServiceView
from kernel.vocabulary import EventKind, JobState, OutboxState

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
