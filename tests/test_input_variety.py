"""Real-world input on real components: storescu -> node -> Orthanc.

Kinds of issue 13 covered here: several image stacks in one series (2), which series feed
a pipeline (3), series that arrive in pieces (4), UIDs that are not strictly valid (6)
and one SOP Instance UID in two series (7). Each study is built from the synthetic
generator's files, rewritten with pydicom (``tests/variants.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from db.models import Event, Instance, Job, Result, Series, Study
from devkit.expect import expected_result_uids
from devkit.phantom import STRUCTURES
from devkit.synth import generate_study
from inference.seg_reader import dice, seg_label_map
from kernel.settings import REPO_ROOT
from tests.conftest import storescu, wait_until
from tests.variants import coronal_reformat, localizer, rewrite

pytestmark = pytest.mark.slow

# The tumour model segments the phantom's kidneys and tumour at this size (Dice >= 0.9).
SIZE = {"rows": 192, "columns": 192, "pixel_spacing_mm": 2.0}
SMALL = {"rows": 64, "columns": 64, "pixel_spacing_mm": 6.0, "slices": 12}


def pacs_node(start_node, orthanc, **overrides):
    destination = {
        "name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port
    }  # fmt: skip
    return start_node(destinations=[destination], **overrides)


def events(node, kind: str) -> list[Event]:
    with node.db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def seg_in_pacs(orthanc, sop_uid: str, timeout_s: float = 300) -> hd.seg.Segmentation:
    blob = orthanc.instance_file(orthanc.wait_for_instance(sop_uid, timeout_s))
    return hd.seg.segread(io.BytesIO(blob))


def referenced_sops(seg: hd.seg.Segmentation) -> set[str]:
    return {
        str(i.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for i in series.ReferencedInstanceSequence
    }


def tumor_dice(seg: hd.seg.Segmentation, files: list[Path], truth: np.ndarray) -> float:
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    numbers, names = seg_label_map(seg, uids)
    tumor = {name: number for number, name in names.items()}["kidney tumor"]
    return dice(numbers == tumor, truth == STRUCTURES["kidney_tumor"])


def test_localizers_and_a_coronal_reformat_do_not_change_what_is_segmented(
    tmp_path, orthanc, start_node
):
    """Kinds 2 and 3: the portal venous series carries two coronal localizers (one sent
    first, one last); a coronal MPR of it (DERIVED, more images, 'PORTAL VENOUS' in its
    description) matches no rule. The tumour SEG is computed on the axial series only."""
    node = pacs_node(start_node, orthanc)
    study = generate_study(tmp_path / "study", seed=31, phases="P", **SIZE)
    portal = study.series[0]
    scouts = [localizer(portal.files[0], tmp_path / "scout" / f"S{i}.dcm") for i in range(2)]
    mpr = coronal_reformat(portal.files, tmp_path / "mpr", "COR MPR PORTAL VENOUS")
    assert len(mpr) > len(portal.files)
    files = [scouts[0], *mpr, *portal.files, scouts[1]]
    assert storescu(files, node.settings.port).returncode == 0

    _, sop_uid, _ = expected_result_uids(node, "tumor", {"image": portal.files})
    seg = seg_in_pacs(orthanc, sop_uid)
    axial_uids = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in portal.files
    }
    assert referenced_sops(seg) == axial_uids
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == portal.series_uid
    assert tumor_dice(seg, portal.files, portal.truth) >= 0.9

    with node.db.session() as s:
        jobs = s.scalars(select(Job)).all()
        assert [(j.pipeline, j.inputs) for j in jobs] == [("tumor", {"image": portal.series_uid})]
        assert jobs[0].summary["left_out"]["image"][0].startswith("LOCALIZER coronal")
        row = s.scalars(select(Series).where(Series.series_uid == portal.series_uid)).one()
        assert (row.phase, row.instance_count) == ("P", len(portal.files) + 2)
    left_out = events(node, "stacks_left_out")
    assert len(left_out) == 1 and "2 images: a localizer" in left_out[0].message
    queued = events(node, "job_queued")[0].message
    assert f"image <- {portal.series_uid} (P" in queued and "ORIGINAL axial" in queued


def test_a_localizer_first_or_last_routes_the_series_the_same_way(tmp_path, start_node):
    """Kind 2 at routing: arrival order of the scout does not matter (no model runs)."""
    node = start_node(worker={"enabled": False})
    outcomes = []
    for seed, scout_first in ((41, True), (42, False)):
        study = generate_study(tmp_path / f"s{seed}", seed=seed, phases="P", **SMALL)
        series = study.series[0]
        scout = localizer(series.files[0], tmp_path / f"scout{seed}.dcm")
        if scout_first:  # alone, in its own association, well before the axial images
            assert storescu([scout], node.settings.port).returncode == 0
            wait_until(lambda s=series: _phase(node, s.series_uid), 30, "the scout routed")
            assert storescu(series.files, node.settings.port).returncode == 0
        else:
            assert storescu([*series.files, scout], node.settings.port).returncode == 0
        wait_until(lambda s=series: _job_for(node, s.series_uid), 30, "the tumour job")
        outcomes.append(_phase(node, series.series_uid))
    assert outcomes == ["P", "P"]


def test_a_series_that_grows_gets_a_new_result_and_the_old_one_is_superseded(
    tmp_path, orthanc, start_node
):
    """Kind 4: half a series, a pause longer than the quiet period, then the whole series
    again. Each result has UIDs of its own input; the partial one is superseded."""
    node = pacs_node(start_node, orthanc)
    study = generate_study(tmp_path / "study", seed=32, phases="P", **SIZE)

    def without_count(_index: int, ds: pydicom.Dataset) -> None:
        del ds.ImagesInAcquisition  # with it the node would see that half is missing

    files = rewrite(study.series[0].files, tmp_path / "p", without_count)
    half = files[: len(files) // 2]
    assert storescu(half, node.settings.port).returncode == 0
    _, partial_uid, _ = expected_result_uids(node, "tumor", {"image": half})
    partial = seg_in_pacs(orthanc, partial_uid)
    assert storescu(files, node.settings.port).returncode == 0
    _, full_uid, _ = expected_result_uids(node, "tumor", {"image": files})
    assert full_uid != partial_uid
    full = seg_in_pacs(orthanc, full_uid)
    assert len(referenced_sops(full)) == len(files)
    assert len(referenced_sops(partial)) == len(half)
    assert partial.SeriesInstanceUID != full.SeriesInstanceUID
    with node.db.session() as s:
        results = {r.sop_uid: r for r in s.scalars(select(Result))}
        assert results[partial_uid].superseded_by == full_uid
        assert results[full_uid].superseded_at is None
    superseded = events(node, "result_superseded")
    assert len(superseded) == 1 and partial_uid in superseded[0].message


@pytest.mark.parametrize(
    "kept, signs",
    [
        (lambda i: i != 5, ["slice positions jump", "InstanceNumbers 1..12 with 1 missing"]),
        (lambda i: i < 6, ["6 of 12 images (ImagesInAcquisition)"]),
    ],
    ids=["hole", "half-with-count"],
)
def test_a_series_the_headers_show_incomplete_waits_for_the_study_to_settle(
    tmp_path, start_node, kept, signs
):
    """Kind 4: a missing slice in the middle (positions and InstanceNumbers show it), or
    half a series whose ImagesInAcquisition says more: the pipeline does not run at
    completion but when the study settles."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        (REPO_ROOT / "routing_rules.yaml").read_text().replace(
            "study_timeout_s: 600", "study_timeout_s: 4"
        )
    )
    node = start_node(worker={"enabled": False}, rules_file=rules)
    study = generate_study(tmp_path / "study", seed=33, phases="P", **SMALL)
    series = study.series[0]
    sent = [f for i, f in enumerate(series.files) if kept(i)]
    assert storescu(sent, node.settings.port).returncode == 0
    wait_until(lambda: events(node, "series_incomplete"), 30, "the incomplete series noted")
    assert _job_for(node, series.series_uid) is None  # not at completion
    job = wait_until(lambda: _job_for(node, series.series_uid), 30, "the job after settling")
    with node.db.session() as s:
        completed = s.scalars(select(Series)).one().completed_at
        last_received = s.scalars(select(Study)).one().last_received_at
    # Queued when the study had been quiet study_timeout_s (4 s after its last instance
    # arrived), well after the series completed (quiet_period_s 0.5 s after it).
    assert (job.queued_at - last_received).total_seconds() >= 4.0 - 0.01
    assert (job.queued_at - completed).total_seconds() >= 2.5
    message = events(node, "series_incomplete")[0].message
    assert all(sign in message for sign in signs), message


def test_uids_with_leading_zeros_are_kept_and_referenced_as_received(
    tmp_path, orthanc, start_node
):
    """Kind 6: Series and SOP Instance UIDs with a leading-zero component are stored (with
    a warning event) and the SEG references them exactly as received."""
    node = pacs_node(start_node, orthanc)
    study = generate_study(tmp_path / "study", seed=34, phases="P", **SIZE)
    series_uid = "1.2.826.0.1.3680043.2.1125.3.0604688119.1"

    def odd_uids(index: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.4.0604688119.{index + 1:03d}"

    files = rewrite(study.series[0].files, tmp_path / "odd", odd_uids)
    proc = storescu(files, node.settings.port)
    assert proc.returncode == 0, proc.stderr
    _, sop_uid, _ = expected_result_uids(node, "tumor", {"image": files})
    seg = seg_in_pacs(orthanc, sop_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    expected = {f"1.2.826.0.1.3680043.2.1125.4.0604688119.{i + 1:03d}" for i in range(len(files))}
    assert referenced_sops(seg) == expected
    warned = events(node, "uid_not_conformant")
    assert len(warned) == 1 and "leading zero (0604688119)" in warned[0].message
    spooled = sorted(p.name for p in (node.settings.spool_dir).rglob("*.dcm"))
    assert spooled == sorted(f"{uid}.dcm" for uid in expected)


def test_one_sop_instance_uid_in_two_series_keeps_both_apart(tmp_path, orthanc, start_node):
    """Kind 7: the A and P series reuse the same SOP Instance UIDs. Both are kept, each
    with its own files, both are classified right and the SEG is computed on P."""
    rules = tmp_path / "rules.yaml"
    base = (REPO_ROOT / "routing_rules.yaml").read_text()
    rules.write_text(
        base[: base.index("rules:\n  - name: contrast-ct-kidney")]
        + "rules:\n  - name: tumour-only\n    when: {Modality: CT, Orientation: axial, "
        "Phase: [A, P]}\n    pipelines: [tumor]\n"
    )
    node = pacs_node(start_node, orthanc, rules_file=rules)
    study = generate_study(tmp_path / "study", seed=35, phases="AP", **SIZE)
    arterial, portal = study.by_phase("A"), study.by_phase("P")
    shared = [
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in arterial.files
    ]

    def reuse(index: int, ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = shared[index]

    assert len(portal.files) == len(shared)
    portal_files = rewrite(portal.files, tmp_path / "p", reuse)
    assert storescu([*arterial.files, *portal_files], node.settings.port).returncode == 0
    _, sop_uid, _ = expected_result_uids(node, "tumor", {"image": portal_files})
    seg = seg_in_pacs(orthanc, sop_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == portal.series_uid
    assert tumor_dice(seg, portal_files, portal.truth) >= 0.9
    with node.db.session() as s:
        phases = {x.series_uid: x.phase for x in s.scalars(select(Series))}
        assert phases == {arterial.series_uid: "A", portal.series_uid: "P"}
        for series in (arterial, portal):
            paths = s.scalars(
                select(Instance.path).join(Series).where(Series.series_uid == series.series_uid)
            ).all()
            assert len(paths) == len(shared)
            assert all(f"/{series.series_uid}/" in p for p in paths)
    duplicate = events(node, "duplicate_sop_uid")
    assert len(duplicate) == 1 and arterial.series_uid in duplicate[0].message


def _phase(node, series_uid: str) -> str | None:
    with node.db.session() as s:
        row = s.scalars(select(Series).where(Series.series_uid == series_uid)).one_or_none()
        return row.phase if row is not None and row.routed_at is not None else None


def _job_for(node, series_uid: str) -> Job | None:
    with node.db.session() as s:
        for job in s.scalars(select(Job)):
            if series_uid in job.inputs.values():
                return job
    return None
