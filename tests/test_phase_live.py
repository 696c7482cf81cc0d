"""Phase from the image in a running node: weak tags make the router ask a worker.

storescu -> node -> routing (tags leave the phase open) -> an urgent evidence job on the
local worker (the coarse organ model) -> routing again with the measurements.
"""

from __future__ import annotations

import numpy as np
import pydicom
from sqlalchemy import select

from db.models import Event, Job, Series
from devkit.synth import generate_study
from inference.phase_evidence import PHASE_EVIDENCE_JOB
from kernel.settings import REPO_ROOT
from tests.conftest import storescu, wait_until
from tests.variants import rewrite

SMALL = {"rows": 80, "columns": 80, "pixel_spacing_mm": 5.0}


def _generic(_index: int, ds: pydicom.Dataset) -> None:
    ds.SeriesDescription = "Abdomen 3.0 B30f"
    for keyword in ("ProtocolName", "ContrastBolusStartTime"):
        if keyword in ds:
            delattr(ds, keyword)


def _series_row(node, uid: str) -> Series | None:
    with node.db.session() as s:
        return s.scalars(select(Series).where(Series.series_uid == uid)).one_or_none()


def test_a_routine_portal_venous_series_with_generic_tags_is_read_from_the_image(
    tmp_path, start_node
):
    node = start_node()
    study = generate_study(tmp_path / "study", seed=51, phases="P", **SMALL)
    files = rewrite(study.series[0].files, tmp_path / "p", _generic)
    assert storescu(files, node.settings.port).returncode == 0
    uid = study.series[0].series_uid

    def tumor_job():
        with node.db.session() as s:
            return s.scalars(select(Job).where(Job.pipeline == "tumor")).first()

    job = wait_until(tumor_job, 120, "the tumour job after the image evidence")
    assert job.inputs == {"image": uid}
    row = _series_row(node, uid)
    assert row.phase == "P" and row.phase_confidence >= 0.7
    assert any(r.startswith("image (organs_6mm): aorta") for r in row.phase_reasons)
    with node.db.session() as s:
        evidence = s.scalars(select(Job).where(Job.pipeline == PHASE_EVIDENCE_JOB)).one()
        assert evidence.state == "done" and evidence.priority > 0  # urgent
        assert evidence.summary["image_evidence"]["hu"]["aorta"] > 120


def test_a_series_without_an_aorta_says_why_and_routing_goes_on(tmp_path, start_node):
    """The organ model finds nothing in a series of air: no image evidence (why), the
    phase stays unknown, nothing crashes and the study settles with the reason."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        (REPO_ROOT / "routing_rules.yaml").read_text().replace(
            "study_timeout_s: 600", "study_timeout_s: 3"
        )
    )
    node = start_node(rules_file=rules)
    study = generate_study(tmp_path / "study", seed=52, phases="P", slices=12, **SMALL)

    def air(index: int, ds: pydicom.Dataset) -> None:
        _generic(index, ds)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()  # -1024 HU

    files = rewrite(study.series[0].files, tmp_path / "air", air)
    assert storescu(files, node.settings.port).returncode == 0
    uid = study.series[0].series_uid

    def reasoned():
        row = _series_row(node, uid)
        return row is not None and any("no image evidence" in r for r in row.phase_reasons or [])

    wait_until(reasoned, 120, "the reason why there is no image evidence")
    row = _series_row(node, uid)
    assert row.phase == "unknown"
    assert any("found no aorta" in r for r in row.phase_reasons)

    def settled():
        with node.db.session() as s:
            return s.scalars(select(Event).where(Event.kind == "study_settled")).first()

    wait_until(settled, 30, "the study to settle")
    with node.db.session() as s:
        assert s.scalars(select(Job).where(Job.pipeline == "tumor")).first() is None


def test_route_explain_reads_the_phase_from_the_image_as_the_node_does(tmp_path):
    """``route explain`` runs the same planning with the image evidence measured in its own
    process; with --no-image-evidence it says what the tags alone say."""
    import json
    import subprocess
    import sys

    study = generate_study(tmp_path / "study", seed=53, phases="P", **SMALL)
    rewrite(study.series[0].files, tmp_path / "p", _generic)
    command = [sys.executable, "-m", "dicom_node.cli", "route", "explain", "--json",
               str(tmp_path / "p")]  # fmt: skip
    with_image = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    item = json.loads(with_image.stdout)[0]
    assert item["phase"] == "P" and item["pipelines"] == ["tumor"]
    assert any(r.startswith("image (organs_6mm): aorta") for r in item["reasons"])
    assert "image evidence: measured in this process" in with_image.stderr
    tags = subprocess.run(
        [*command, "--no-image-evidence"], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(tags.stdout)[0]["phase"] == "unknown"
