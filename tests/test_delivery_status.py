"""Review before sending in the outbox, the status vocabulary of a study and destination
health, on real rows written by the real writers (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import func, select

from db.models import DestinationEcho, Dispatch, Event, Job, Study, utcnow
from dicom_node import health, status
from dicom_node.echo import EchoAnswer
from dicom_node.instance import InstanceHeader
from dicom_node.records import Origin, path_study, record_instance
from dicom_node.web import queries
from inference import queue
from inference.jobrun import JobRunner, WrittenSeg
from kernel import outbox
from kernel.catalog import PipelineSpec
from kernel.events import add_event
from kernel.outbox import SendOutcome
from kernel.settings import DispatchSettings, load_settings
from kernel.vocabulary import DeliveryStatus, DestinationState, EventKind, OutboxState

S = DeliveryStatus
ORIGIN = Origin("CT1", "DICOM_NODE", "127.0.0.1")
STUDY, SERIES = "1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2"
SETTINGS = DispatchSettings(retry_initial_s=1, retry_max_s=2, max_attempts=5, max_age_s=3600)


def _header(n: int) -> InstanceHeader:
    return InstanceHeader(
        study_uid=STUDY,
        series_uid=SERIES,
        sop_uid=f"{SERIES}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        instance_number=n,
        series_number=3,
        series_description="PORTAL VENOUS",
    )


def _routed_study(db, pipelines=("tumor",)) -> int:
    """A complete, routed series whose rule asked for ``pipelines``; the study id."""
    record_instance(db, _header(1), "/spool/1.dcm", 1, ORIGIN)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        series = study.series[0]
        series.state, series.completed_at = "complete", utcnow()
        series.routed_at, series.phase, series.matched_rule = utcnow(), "P", "kidney"
        add_event(
            s,
            EventKind.ROUTED,
            "rule 'kidney' matched",
            study_uid=STUDY,
            series_uid=SERIES,
            data={
                "pipelines": list(pipelines),
                "forward": [],
                "matched_rules": ["kidney"],
                "not_matched": [],
            },
        )
        return study.id


def _runner(db, review: str = "none", destinations=("pacs",), dest_review=()) -> JobRunner:
    settings = load_settings(
        None,
        destinations=[
            {
                "name": d,
                "ae_title": d.upper(),
                "host": "127.0.0.1",
                "port": 104,
                "review": "required" if d in dest_review else "none",
            }
            for d in destinations
        ],
    )
    spec = PipelineSpec(models=["tumor"], review=review)
    return JobRunner(db, None, lambda _name: spec, Path("/tmp"), settings.result_destination_list)


def _job_with_result(
    db,
    runner: JobRunner,
    pipeline: str = "tumor",
    empty: bool = False,
    sop: str = "1.2.826.0.1.3680043.10.9.100",
) -> int:
    """A job run to the end whose result the real job runner records (and holds)."""
    with db.session() as s:
        job = queue.enqueue(s, s.scalars(select(Study)).one(), pipeline, {"image": SERIES})
        job_id = job.id
    assert queue.claim(db, "w", "cpu").id == job_id
    names = tuple(d.name for d in runner.destinations())
    seg = WrittenSeg(
        Path("/tmp/seg.dcm"), sop, sop + ".1", SERIES, 2, destinations=names, empty=empty
    )
    summary = {"empty": True} if empty else {}
    record = (lambda s, row: runner._record_result(s, row, seg)) if names or not empty else None
    assert queue.finish(db, job_id, summary, record=record) == "done"
    return job_id


def _deliver(db, outcome: str = "sent", detail: str = "success") -> None:
    rows = outbox.claim_due(db, 100)
    status_code = 0 if outcome == "sent" else None
    outbox.record_outcomes(
        db, rows, {r.id: SendOutcome(outcome, status_code, detail) for r in rows}, SETTINGS
    )


def _status(db, settings=None) -> status.StudyStatus:
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        found = health.destination_health(s, settings) if settings else None
        return status.study_status(s, study, found)


def test_held_results_wait_for_a_reviewer_then_go_or_never_go(db):
    _routed_study(db)
    runner = _runner(db, destinations=("pacs", "archive"), dest_review=("pacs",))
    _job_with_result(db, runner)
    with db.session() as s:
        states = dict(s.execute(select(Dispatch.destination, Dispatch.state)).all())
        kinds = s.scalars(select(Event.kind).order_by(Event.id)).all()
    assert states == {"pacs": "held", "archive": "pending"}
    assert "result_held" in kinds
    _deliver(db)  # only archive goes
    st = _status(db)
    assert st.status == S.HELD and "waits for a reviewer: SEG to pacs" in st.reason

    held_id = next(i for i, d in _ids(db) if d == "pacs")
    assert outbox.resend(db, [held_id], by="ada") == 0  # a resend never releases it
    with pytest.raises(outbox.ReviewError, match="needs a reason"):
        outbox.reject(db, "1.2.826.0.1.3680043.10.9.100", "rita", "  ")
    assert outbox.approve(db, "1.2.826.0.1.3680043.10.9.100", "rita", "looks right") == 1
    with db.session() as s:
        row = s.get_one(Dispatch, held_id)
        assert (row.state, row.reviewed_by, row.review_note) == ("pending", "rita", "looks right")
        approved = s.scalars(select(Event).where(Event.kind == "result_approved")).one()
        assert "tumor SEG" in approved.message and "series 3 PORTAL VENOUS" in approved.message
        assert approved.job_id is not None and approved.series_uid == SERIES
    with pytest.raises(outbox.ReviewError, match="no send waiting"):
        outbox.approve(db, "1.2.826.0.1.3680043.10.9.100", "rita")
    _deliver(db)
    assert _status(db).status == S.DELIVERED


def test_a_rejected_result_is_never_sent_and_says_who_and_why(db):
    _routed_study(db)
    _job_with_result(db, _runner(db, review="required"))
    outbox.reject(db, "1.2.826.0.1.3680043.10.9.100", "rita", "kidney outline leaks into liver")
    assert outbox.claim_due(db, 10) == []
    st = _status(db)
    assert st.status == S.REJECTED
    assert st.reason == "tumor: SEG to pacs rejected by rita: kidney outline leaks into liver"
    with db.session() as s:
        row = s.scalars(select(Dispatch)).one()
        assert row.state == OutboxState.REJECTED and row.reviewed_at is not None


def test_two_of_three_pipelines_cancelled_is_partially_delivered_not_done(db):
    _routed_study(db, pipelines=("tumor", "vessel", "ureter"))
    _job_with_result(db, _runner(db))
    _deliver(db)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        ids = [queue.enqueue(s, study, name, {"image": SERIES}).id for name in ("vessel", "ureter")]
    for job_id in ids:
        assert queue.cancel(db, job_id, by="ada") == "cancelled"
    st = _status(db)
    assert st.status == S.PARTIALLY_DELIVERED
    assert "vessel cancelled" in st.reason and "ureter cancelled" in st.reason
    assert [(i.name, i.status) for i in st.items] == [
        ("tumor", S.DELIVERED),
        ("vessel", S.CANCELLED),
        ("ureter", S.CANCELLED),
    ]


def test_nothing_found_and_nothing_sent_is_not_sent_in_grey(db):
    _routed_study(db)
    _job_with_result(db, _runner(db, destinations=()), empty=True)
    st = _status(db)
    assert st.status == S.NOT_SENT and status.TONES[st.status] == "neutral"
    assert "found nothing; nothing sent" in st.reason


def test_a_pipeline_without_its_input_waits_then_is_not_run(db):
    study_id = _routed_study(db, pipelines=("ureter",))
    spec = {"ureter": PipelineSpec(models=["ureter"], inputs={"D": ["D"]})}
    with db.session() as s:
        study = s.get_one(Study, study_id)
        st = status.study_status(s, study, None, spec, study_timeout_s=600)
        settles = status.utc_clock(study.last_received_at + timedelta(seconds=600))
    assert (st.status, st.reason) == (
        S.WAITING,
        "ureter: waiting for a delayed (D) series; none received yet; if none arrives it does "
        f"not run when the study settles at {settles} (study_timeout_s 600 s)",
    )
    with db.session() as s:
        add_event(
            s,
            EventKind.PIPELINE_NOT_RUN,
            "ureter: not run: no delayed (D) series arrived before the study settled",
            study_uid=STUDY,
        )
        add_event(s, EventKind.STUDY_SETTLED, "no instance for 600 s", study_uid=STUDY)
    with db.session() as s:
        st = status.study_status(s, s.get_one(Study, study_id), None, spec, study_timeout_s=600)
    assert (st.status, st.reason) == (
        S.NOT_RUN,
        "ureter: no delayed (D) series arrived before the study settled",
    )


def test_no_rule_matched_names_the_failing_condition(db):
    record_instance(db, _header(1), "/spool/1.dcm", 1, ORIGIN)
    with db.session() as s:
        series = s.scalars(select(Study)).one().series[0]
        series.state, series.completed_at, series.routed_at = "complete", utcnow(), utcnow()
        add_event(
            s,
            EventKind.ROUTED,
            "no rule matched",
            study_uid=STUDY,
            series_uid=SERIES,
            data={
                "pipelines": [],
                "forward": [],
                "matched_rules": [],
                "not_matched": [
                    {"rule": "contrast-ct-kidney", "failure": "Orientation coronal is not axial"}
                ],
            },
        )
    st = _status(db)
    assert (st.status, st.reason) == (S.NO_RULE_MATCHED, "Orientation coronal is not axial")


def test_destination_health_from_sends_and_kept_echoes(db):
    settings = load_settings(
        None,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        health={"pending_alert_s": 60},
    )
    _routed_study(db)
    _job_with_result(db, _runner(db))
    with db.session() as s:
        assert health.destination_health(s, settings)["pacs"].state == DestinationState.UNKNOWN
    _deliver(db, "retry", "association refused or aborted (destination down?)")
    with db.session() as s:
        h = health.destination_health(s, settings)["pacs"]
        assert h.state == DestinationState.UNREACHABLE and h.pending == 1 and h.alert
        assert "association refused" in h.reason
    st = _status(db, settings)
    assert st.status == S.DELIVERY_PENDING and "pacs unreachable" in st.reason

    # It answers a C-ECHO again: healthy, and the waiting send is due at once.
    assert health.record_echo(db, "pacs", EchoAnswer(False, "refused", 1.0), "periodic") is False
    assert health.record_echo(db, "pacs", EchoAnswer(True, "success", 2.0), "periodic") is True
    assert outbox.due_now(db, "pacs") == 1
    with db.session() as s:
        h = health.destination_health(s, settings)["pacs"]
        assert h.state == DestinationState.OK and h.last_echo["ok"] is True
        kinds = s.scalars(select(Event.kind).where(Event.kind.like("destination_%"))).all()
        assert kinds == ["destination_down", "destination_up"]
        # Undelivered for longer than pending_alert_s: a backlog, even though it answers.
        row = s.scalars(select(Dispatch)).one()
        row.queued_at = utcnow() - timedelta(seconds=120)
    with db.session() as s:
        h = health.destination_health(s, settings)["pacs"]
        assert h.state == DestinationState.BACKLOG and h.overdue == 1
    _deliver(db)
    with db.session() as s:
        assert health.destination_health(s, settings)["pacs"].state == DestinationState.OK
        assert s.scalars(select(Dispatch)).one().last_attempt_at is not None
    assert health.prune_echoes(db, keep_days=0) == 2
    with db.session() as s:
        assert s.scalars(select(DestinationEcho)).all() == []


def test_migration_0005_matches_the_models(db_url):
    engine = sqlalchemy.create_engine(db_url)
    inspector = sqlalchemy.inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("dispatches")}
    echoes = {c["name"] for c in inspector.get_columns("destination_echoes")}
    engine.dispose()
    assert {"last_attempt_at", "reviewed_by", "reviewed_at", "review_note"} <= columns
    assert echoes == set(DestinationEcho.__table__.columns.keys())


def _ids(db) -> list[tuple[int, str]]:
    with db.session() as s:
        return [tuple(r) for r in s.execute(select(Dispatch.id, Dispatch.destination)).all()]


def test_job_summary_and_runs_never_step_backwards(db):
    """The run timeline of a job queued again by a user: two runs, steps never negative."""
    from dicom_node.web import timeline

    _routed_study(db)
    job_id = _job_with_result(db, _runner(db))
    _deliver(db)
    queue.retry(db, job_id, by="ada")
    assert queue.claim(db, "w", "cpu").id == job_id
    assert queue.finish(db, job_id, {}) == "done"
    ids = [i for i, _ in _ids(db)]
    outbox.resend(db, ids, by="ada")
    _deliver(db)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        jobs = s.scalars(select(Job)).all()
        events = s.scalars(select(Event)).all()
        runs = timeline.runs(study, list(jobs), list(events))
    assert [(r.job_id, r.number) for r in runs] == [(job_id, 1), (job_id, 2)]
    assert [row.step for row in runs[1].rows] == ["retry", "started", "inferred", "resend", "sent"]
    assert runs[0].rows[0].step == "received" and "sent" in [r.step for r in runs[0].rows]
    for run in runs:
        assert all(r.after_s is None or r.after_s >= 0 for r in run.rows)
        assert run.total_s is not None and run.total_s >= 0


def test_a_pipeline_whose_phase_never_came_does_not_make_the_rest_partial(db):
    study_id = _routed_study(db, pipelines=("tumor", "vessel"))
    _job_with_result(db, _runner(db))
    _deliver(db)
    spec = {"vessel": PipelineSpec(models=["vessel"], inputs={"A": ["A"], "P": ["P"]})}
    with db.session() as s:
        add_event(s, EventKind.PIPELINE_NOT_RUN, "vessel: waiting (A needs A)", study_uid=STUDY)
        # (the words of an older node's event: the reason is the current one's)
        add_event(s, EventKind.STUDY_SETTLED, "no instance for 600 s", study_uid=STUDY)
    with db.session() as s:
        st = status.study_status(s, s.get_one(Study, study_id), None, spec)
    assert st.status == S.DELIVERED and status.TONES[st.status] == "ok"
    assert st.reason == (
        "tumor: SEG to pacs; vessel: no arterial (A) series arrived before the study settled"
    )
    assert [(i.name, i.status) for i in st.items] == [
        ("tumor", S.DELIVERED),
        ("vessel", S.NOT_RUN),
    ]


def _path_status(db, study_id: int) -> tuple[status.StudyStatus, dict, list[str]]:
    """The path study's status, the day's counts and the studies the list's filters find."""
    viewer = queries.Viewer(load_settings(None))
    with db.session() as s:
        st = status.study_status(s, s.get_one(Study, study_id))
        counts = status.recent_counts(s, utcnow() - timedelta(days=1))
        found = [
            name for name in (str(x) for x in S) if queries.studies(s, viewer, status=name)["items"]
        ]
        if queries.studies(s, viewer, status=queries.IN_PROGRESS)["items"]:
            found.append(queries.IN_PROGRESS)
    return st, counts, found


def test_a_path_api_request_carries_its_jobs_state_never_receiving(db):
    """A path API request is a study row without series: queued, running, failed (why)
    and done (the mask went to the caller) on the status, the day's counts and the list's
    filters alike; never "receiving"."""
    inputs = {"image": {"path": "/data/p"}}
    with db.session() as s:
        study = path_study(s, inputs)
        study_id = study.id
        queue.enqueue(s, study, "tumor", inputs)
    st, counts, found = _path_status(db, study_id)
    assert (st.status, st.reason) == (S.QUEUED, "tumor: waits for a worker")
    assert counts[S.RECEIVING] == 0 and counts[S.QUEUED] == 1
    assert found == ["queued", queries.IN_PROGRESS]
    job = queue.claim(db, "w", "cpu")
    st, counts, found = _path_status(db, study_id)
    assert st.status == S.RUNNING and counts[S.RUNNING] == 1 and counts[S.RECEIVING] == 0
    assert queue.fail(db, job.id, "input image: /data/p could not be read", retry=False)
    st, counts, found = _path_status(db, study_id)
    assert (st.status, st.reason) == (S.FAILED, "tumor: input image: /data/p could not be read")
    assert counts[S.FAILED] == 1 and counts[S.RECEIVING] == 0 and found == ["failed"]

    queue.retry(db, job.id)
    assert queue.claim(db, "w", "cpu").id == job.id
    queue.finish(db, job.id, {"mask_path": "/data/masks/1/tumor.nii.gz"})
    st, counts, found = _path_status(db, study_id)
    assert (st.status, st.tone) == (S.DELIVERED, "ok")
    assert st.reason == (
        "tumor: path API: mask written to /data/masks/1/tumor.nii.gz (nothing is sent to a PACS)"
    )
    assert counts[S.DELIVERED] == 1 and sum(counts.values()) == 1 and found == ["delivered"]


def test_unreachable_since_is_the_first_failure_of_the_outage_sends_and_echoes_together(db):
    settings = load_settings(
        None, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]
    )
    _routed_study(db)
    _job_with_result(db, _runner(db))
    _deliver(db, "retry", "association refused or aborted (destination down?)")
    with db.session() as s:
        first = s.scalar(select(Event.at).where(Event.kind == EventKind.SEND_RETRY))
        assert health.destination_health(s, settings)["pacs"].since == first
    # The same outage: a failed C-ECHO, then the send retried and failing again.
    health.record_echo(db, "pacs", EchoAnswer(False, "connection refused", 1.0), "periodic")
    assert outbox.due_now(db, "pacs") == 1
    _deliver(db, "retry", "association refused or aborted (destination down?)")
    with db.session() as s:
        h = health.destination_health(s, settings)["pacs"]
        assert (h.state, h.since) == (DestinationState.UNREACHABLE, first)
        st = status.study_status(s, s.scalars(select(Study)).one(), {"pacs": h})
    assert st.reason == f"tumor: pacs unreachable since {status.utc_clock(first)}: {h.reason}"
    # It answers, then fails again: a new outage from the new first failure.
    health.record_echo(db, "pacs", EchoAnswer(True, "success", 1.0), "periodic")
    health.record_echo(db, "pacs", EchoAnswer(False, "connection refused", 1.0), "periodic")
    with db.session() as s:
        again = s.scalar(select(func.max(DestinationEcho.at)))
        assert again > first and health.destination_health(s, settings)["pacs"].since == again


def test_a_failure_shows_at_once_while_another_pipeline_still_waits(db):
    """tumor failed for good, ureter waits (up to study_timeout_s) for its D series: the
    study is failed now, in red, naming the failure and what is still in progress, not
    "waiting for inputs" for ten minutes."""
    study_id = _routed_study(db, pipelines=("tumor", "ureter"))
    with db.session() as s:
        job_id = queue.enqueue(s, s.get_one(Study, study_id), "tumor", {"image": SERIES}).id
    assert queue.claim(db, "w", "cpu").id == job_id
    error = "instance 7 has 131072 of 524288 pixel bytes"
    assert queue.fail(db, job_id, error, retry=False) == "failed"
    spec = {
        "tumor": PipelineSpec(models=["tumor"]),
        "ureter": PipelineSpec(models=["ureter"], inputs={"D": ["D"]}),
    }
    with db.session() as s:
        st = status.study_status(s, s.get_one(Study, study_id), None, spec, study_timeout_s=600)
    assert st.status == S.FAILED and status.TONES[st.status] == "bad"
    assert "tumor: " in st.reason and "131072 of 524288" in st.reason
    assert "still: ureter waiting for inputs" in st.reason
    assert [(i.name, i.status) for i in st.items] == [("tumor", S.FAILED), ("ureter", S.WAITING)]
