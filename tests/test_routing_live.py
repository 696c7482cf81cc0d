"""Routing in a running node: forwarding, multi-phase triggers, study timeout, reload."""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta

import pydicom
from sqlalchemy import select

from db.models import Event, Job, Study
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from kernel.settings import REPO_ROOT
from tests.conftest import storescu, wait_until

BASE_RULES = (REPO_ROOT / "routing_rules.yaml").read_text()


def rules_file(tmp_path, pipelines: str, rules: str, timeout_s: float = 600) -> str:
    """The shipped phase settings with test pipelines and rules."""
    head = BASE_RULES[: BASE_RULES.index("# Pipelines:")]
    head = head.replace("study_timeout_s: 600", f"study_timeout_s: {timeout_s}")
    path = tmp_path / "rules.yaml"
    path.write_text(head + pipelines + rules)
    return str(path)


def test_forward_rule_sends_originals_unchanged_to_a_second_pacs(tmp_path, start_node):
    pipelines = "pipelines: {}\n"
    rules = """
rules:
  - name: arterial-to-archive
    when: {Modality: CT, Phase: A}
    forward: [archive]
"""
    with OrthancServer(tmp_path / "archive", aet="ARCHIVE", throwaway=True) as archive:
        node = start_node(
            rules_file=rules_file(tmp_path, pipelines, rules),
            destinations=[
                {
                    "name": "archive",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": archive.dicom_port,
                }
            ],
            worker={"enabled": False},
        )
        study = generate_study(tmp_path / "s", seed=21, rows=64, columns=64, slices=6, phases="NA")
        files = [f for s in study.series for f in s.files]
        assert storescu(files, node.settings.port).returncode == 0
        arterial = study.by_phase("A")
        try:
            wait_until(lambda: archive.count_instances() == len(arterial.files), 120, "forwarding")
        except AssertionError:
            with node.db.session() as s:
                events = [f"{e.kind}: {e.message}" for e in s.scalars(select(Event))]
            raise AssertionError(
                f"archive has {archive.count_instances()}; events: {events}"
            ) from None
        time.sleep(1.0)
        assert archive.count_instances() == len(arterial.files)  # N was not forwarded
        for path in arterial.files:
            sent = pydicom.dcmread(path)
            got = pydicom.dcmread(
                io.BytesIO(archive.instance_file(archive.find_instance(sent.SOPInstanceUID)))
            )
            assert got.PixelData == sent.PixelData
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID


VESSEL_LIKE = """
pipelines:
  both:
    models: [tumor]
    inputs: {image: [A], portal: [P]}
  delayed:
    models: [tumor]
    inputs: {image: [D]}
"""
VESSEL_RULES = """
rules:
  - name: contrast
    when: {Modality: CT, Phase: [A, P, D]}
    pipelines: [both, delayed]
"""


def _jobs(node) -> list[tuple[str, dict]]:
    with node.db.session() as s:
        return [(j.pipeline, j.inputs) for j in s.scalars(select(Job).order_by(Job.id))]


def test_two_phase_pipeline_fires_once_when_both_phases_are_complete(tmp_path, start_node):
    node = start_node(
        rules_file=rules_file(tmp_path, VESSEL_LIKE, VESSEL_RULES),
        worker={"enabled": False},
    )
    study = generate_study(tmp_path / "s", seed=22, rows=32, columns=32, slices=6, phases="NAP")
    arterial, portal = study.by_phase("A"), study.by_phase("P")
    # Interleaved over several associations: half of A, all of N, half of P, the rest.
    assert storescu(arterial.files[:3] + portal.files[:3], node.settings.port).returncode == 0
    assert storescu(study.by_phase("N").files, node.settings.port).returncode == 0
    wait_until(lambda: _series_complete(node) == 3, 30, "first parts complete")
    # Half-complete A and P are complete series too (quiet + released) - but the missing
    # halves re-open them; the pipeline may only fire on what is there, so check it
    # waits for the real thing: nothing fired yet? It fires with the partial series.
    assert storescu(arterial.files[3:] + portal.files[3:], node.settings.port).returncode == 0
    wait_until(lambda: _series_complete(node) == 3 and _jobs(node), 30, "the job")
    time.sleep(2.0)
    both = [inputs for name, inputs in _jobs(node) if name == "both"]
    assert {"image": arterial.series_uid, "portal": portal.series_uid} in both
    assert all(set(i) == {"image", "portal"} for i in both)
    assert [name for name, _ in _jobs(node)].count("delayed") == 0


def _series_complete(node) -> int:
    from db.models import Series

    with node.db.session() as s:
        return len(s.scalars(select(Series).where(Series.state == "complete")).all())


def test_pipeline_waits_for_the_second_phase_then_fires_once(tmp_path, start_node):
    node = start_node(
        rules_file=rules_file(tmp_path, VESSEL_LIKE, VESSEL_RULES),
        worker={"enabled": False},
    )
    study = generate_study(tmp_path / "s", seed=23, rows=32, columns=32, slices=4, phases="AP")
    assert storescu(study.by_phase("A").files, node.settings.port).returncode == 0
    wait_until(lambda: _series_complete(node) == 1, 30, "A complete")
    time.sleep(1.0)
    assert _jobs(node) == []  # P is missing: nothing runs
    assert storescu(study.by_phase("P").files, node.settings.port).returncode == 0
    wait_until(lambda: _jobs(node), 30, "the job")
    time.sleep(1.5)
    assert _jobs(node) == [
        (
            "both",
            {"image": study.by_phase("A").series_uid, "portal": study.by_phase("P").series_uid},
        )
    ]


def test_missing_phase_at_study_timeout_is_recorded(tmp_path, start_node):
    node = start_node(
        rules_file=rules_file(tmp_path, VESSEL_LIKE, VESSEL_RULES, timeout_s=2),
        worker={"enabled": False},
    )
    study = generate_study(tmp_path / "s", seed=24, rows=32, columns=32, slices=3, phases="AP")
    files = [f for s in study.series for f in s.files]
    assert storescu(files, node.settings.port).returncode == 0

    def note():
        with node.db.session() as s:
            return s.scalars(select(Study)).one().note

    text = wait_until(note, 30, "the study note")
    assert "delayed: not run: no delayed (D) series arrived before the study settled" in text
    with node.db.session() as s:
        kinds = s.scalars(select(Event.kind).where(Event.level == "warning")).all()
        told = s.scalars(select(Event.message).where(Event.kind == "pipeline_not_run")).all()
    assert "pipeline_not_run" in kinds
    assert told == ["delayed: not run: no delayed (D) series arrived before the study settled"]
    assert [name for name, _ in _jobs(node)] == ["both"]


def test_broken_rules_edit_keeps_the_node_routing_with_the_old_rules(tmp_path, start_node):
    path = rules_file(tmp_path, VESSEL_LIKE, VESSEL_RULES)
    node = start_node(rules_file=path, worker={"enabled": False})
    with open(path, "a") as fh:
        fh.write("  - name: broken\n    when: {Modality: {regex: '('}}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    study = generate_study(tmp_path / "s", seed=25, rows=32, columns=32, slices=3, phases="AP")
    assert storescu([f for s in study.series for f in s.files], node.settings.port).returncode == 0
    wait_until(lambda: _jobs(node), 30, "routing with the old rules")
    assert node.rules.last_reload.ok is False
    with node.db.session() as s:
        assert s.scalars(select(Event).where(Event.kind == "rules_reload_failed")).first()


def test_a_series_forwarded_again_gets_a_fresh_delivery_age(tmp_path, start_node):
    """Re-forwarding instances delivered long ago restarts their max-age clock: the first
    failed attempt of the re-forward is a retry, not "not delivered within max_age_s"."""
    from db.models import Dispatch, utcnow
    from devkit.net import free_port

    rules = """
rules:
  - name: ct-to-archive
    when: {Modality: CT}
    forward: [archive]
"""
    node = start_node(
        rules_file=rules_file(tmp_path, "pipelines: {}\n", rules),
        destinations=[
            {"name": "archive", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
        ],  # fmt: skip
        worker={"enabled": False},
        dispatch={"retry_initial_s": 30.0, "max_age_s": 3600.0, "timeout_s": 5},
    )
    study = generate_study(tmp_path / "s", seed=22, rows=32, columns=32, slices=3, phases="P")
    files = study.series[0].files

    def rows() -> list[Dispatch]:
        with node.db.session() as s:
            return list(s.scalars(select(Dispatch).order_by(Dispatch.id)))

    assert storescu(files, node.settings.port).returncode == 0
    wait_until(lambda: len(rows()) == 3 and all(r.attempts >= 1 for r in rows()), 60, "sends")
    long_ago = utcnow() - timedelta(hours=2)
    with node.db.session() as s:  # as if delivered two hours ago
        for row in s.scalars(select(Dispatch)):
            row.state, row.sent_at, row.queued_at = "sent", long_ago, long_ago
    assert storescu(files, node.settings.port).returncode == 0  # the modality sends again

    def retried_again() -> bool:
        return all(r.queued_at > long_ago and r.attempts == 1 for r in rows())

    wait_until(retried_again, 60, "the re-forward's first attempt")
    assert [r.state for r in rows()] == ["pending"] * 3, [r.last_error for r in rows()]
