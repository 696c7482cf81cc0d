"""The seed service's HTTP path API on a running node, over real HTTP with an API token.

All four shipped pipelines answer a NIfTI mask in the physical space of their (reference)
input, through the node's own job queue and CPU worker; bad requests get a 4xx that says
what is wrong and queue nothing.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from db.models import Event, Job
from devkit.phantom import STRUCTURES
from devkit.synth import generate_study
from inference.nifti_io import read_nifti, write_volume
from inference.path_api import load_input
from inference.seg_reader import dice
from tests.web_helpers import make_users

KIDNEYS = ("kidney_left", "kidney_right")
# pipeline -> (reference phase, {mask value: phantom structures}) for the shipped models.
EXPECTED = {
    "totalseg": ("P", {1: ("spleen",), 2: ("kidney_right",), 3: ("kidney_left",),
                       4: ("liver",), 5: ("aorta",), 6: ("inferior_vena_cava",)}),
    "tumor": ("P", {1: KIDNEYS, 2: ("kidney_tumor",)}),
    "vessel": ("A", {1: KIDNEYS, 2: ("aorta",), 3: ("inferior_vena_cava",)}),
    "ureter": ("D", {1: ("ureter_left", "ureter_right"), 2: KIDNEYS}),
}  # fmt: skip


@pytest.fixture
def api(tmp_path: Path, start_node):
    # the shipped models.yaml and routing_rules.yaml, local CPU worker; the path API may
    # read the test's folder
    node = start_node(path_api={"allowed_roots": [tmp_path]})
    token = make_users(node)
    with httpx.Client(
        base_url=f"http://127.0.0.1:{node.web_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=600,
    ) as client:
        yield node, client


def test_all_four_pipelines_answer_a_mask_in_the_input_space(tmp_path: Path, api) -> None:
    node, client = api
    study = generate_study(tmp_path / "study", seed=7, phases="APD", rows=192, columns=192,
                           pixel_spacing_mm=2.0, slice_thickness_mm=2.5)  # fmt: skip
    folders = {s.phase: s.files[0].parent for s in study.series}
    # NIfTI files and DICOM folders are both accepted: totalseg reads P as NIfTI.
    references = {phase: load_input({"path": str(folders[phase])}) for phase in "APD"}
    p_nifti = write_volume(references["P"], tmp_path / "p.nii.gz")
    bodies = {
        "totalseg": {"image_path": str(p_nifti)},
        "tumor": {"image_path": str(folders["P"])},
        "vessel": {"image_A_path": str(folders["A"]), "image_P_path": str(folders["P"])},
        "ureter": {"image_D_path": str(folders["D"])},
    }

    listed = client.get("/models").json()["models"]
    assert {m["id"] for m in listed} >= set(EXPECTED)
    ureter = next(m for m in listed if m["id"] == "ureter")
    assert ureter["channels"] == ["D"] and ureter["labels"] == {"1": "ureter", "2": "kidney"}

    for pipeline, (phase, structures) in EXPECTED.items():
        r = client.post(f"/inference/{pipeline}", json=bodies[pipeline])
        assert r.status_code == 200, (pipeline, r.text)
        mask = read_nifti(Path(r.json()["mask_path"]))
        reference = references[phase]
        assert mask.shape == reference.shape, pipeline
        np.testing.assert_allclose(mask.origin_lps, reference.origin_lps, atol=1e-3)
        np.testing.assert_allclose(mask.spacing_zyx, reference.spacing_zyx, atol=1e-4)
        np.testing.assert_allclose(mask.direction, reference.direction, atol=1e-6)
        truth = study.by_phase(phase).truth
        for value, names in structures.items():
            expected = np.isin(truth, [STRUCTURES[n] for n in names])
            assert dice(mask.array == value, expected) >= 0.9, (pipeline, names)
    with node.db.session() as s:
        states = s.execute(select(Job.pipeline, Job.state)).all()
    assert sorted(states) == sorted((p, "done") for p in EXPECTED)


def test_bad_requests_get_a_clear_4xx(tmp_path: Path, api) -> None:
    node, client = api
    study = generate_study(tmp_path / "study", seed=5, phases="A", rows=32, columns=32,
                           pixel_spacing_mm=8.0, slice_thickness_mm=8.0)  # fmt: skip
    a_folder = str(study.series[0].files[0].parent)

    r = client.post("/inference/vessel", json={"image_A_path": a_folder})
    assert r.status_code == 400 and "image_P_path is missing" in r.text
    r = client.post("/inference/ureter", json={"image_D_path": str(tmp_path / "none.nii.gz")})
    assert r.status_code == 400 and "does not exist" in r.text
    r = client.post("/inference/ureter", json={"image_D_path": "relative/ct.nii.gz"})
    assert r.status_code == 400 and "absolute path" in r.text
    r = client.post("/inference/lungs", json={"image_path": a_folder})
    assert r.status_code == 404 and "not defined" in r.text
    with node.db.session() as s:
        assert s.scalar(select(func.count(Job.id))) == 0  # nothing was queued

    # A file that only looks like NIfTI is queued, fails on reading, and says so.
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    r = client.post("/inference/tumor", json={"image_path": str(broken)})
    job_id = int(r.json()["detail"].split()[1])
    why = f"{broken} cannot be read as an image: it is not a NIfTI file; accepted: a NIfTI"
    assert r.status_code == 422 and r.json()["detail"].startswith(f"job {job_id} failed: {why}")
    assert "sitk" not in r.text and "Error" not in r.text  # the reader's words: log only
    with node.db.session() as s:  # an input error is not retried: one attempt, failed
        job = s.get(Job, job_id)
        assert (job.state, job.attempts) == ("failed", 1)
        failed = s.scalars(select(Event.message).where(Event.job_id == job.id)).all()
        assert any("failed on its input (not retried)" in m for m in failed), failed
    # The request is listed with its job's state, never as a study still receiving.
    (listed,) = client.get("/api/studies").json()["items"]
    assert (listed["study_description"], listed["status"]) == ("path API request", "failed")
    assert why in listed["status_reason"]
    page = client.get(f"/studies/{listed['study_uid']}").text
    assert "not a NIfTI file" in page and "receiving" not in page and "no series yet" not in page
    assert client.get("/api/dashboard").json()["today"]["in_progress"] == 0
    metrics = client.get("/metrics").text
    assert 'dicom_node_studies_recent{status="receiving"} 0.0' in metrics
    assert 'dicom_node_studies_recent{status="failed"} 1.0' in metrics
    assert client.post("/inference/tumor", json={"image_path": a_folder}).status_code == 200
    assert httpx.post(f"{client.base_url}/inference/tumor", json={}).status_code == 401


def test_path_jobs_take_the_worker_settings_and_an_expired_job_says_so(
    tmp_path: Path, start_node
) -> None:
    """``worker.max_attempts`` applies to path API jobs as to DICOM jobs, and a job that
    expired in the queue answers 410 instead of "running" for ever."""
    from inference import queue

    node = start_node(
        worker={"enabled": False, "max_attempts": 5}, path_api={"allowed_roots": [tmp_path]}
    )
    token = make_users(node)
    folder = tmp_path / "series"
    folder.mkdir()
    with httpx.Client(
        base_url=f"http://127.0.0.1:{node.web_port}",
        headers={"Authorization": f"Bearer {token}"},
    ) as client:
        r = client.post("/inference/tumor?wait_s=0", json={"image_path": str(folder)})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        with node.db.session() as s:
            assert s.get(Job, job_id).max_attempts == 5
        assert client.get(f"/inference/jobs/{job_id}").status_code == 202  # still queued
        assert queue.expire_queued(node.db, max_age_s=0) == 1
        r = client.get(f"/inference/jobs/{job_id}")
        assert r.status_code == 410 and "expired" in r.text, r.text
