"""The result viewer's drawing (colours, default slice, volumes) on real SEG and RTSTRUCT
files, and the review and health routes of a running node (roles, CSRF-free tokens)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.color import CIELabColor
from PIL import Image
from sqlalchemy import select

from devkit.synth import generate_study
from dicom_node.web import viewer
from inference.labels import ANATOMICAL_STRUCTURE, SegmentLabel
from inference.results import Algorithm
from inference.rtstruct_writer import write_rtstruct
from inference.seg_writer import write_seg
from kernel.uids import derived_uid
from tests.conftest import wait_until
from tests.test_seg_writer import KIDNEY
from tests.web_helpers import PASSWORD, client_for, make_users, modelless_settings

KIDNEY_RGB, TUMOUR_RGB = (185, 102, 83), (230, 220, 70)  # models.yaml's tumor model


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[pydicom.Dataset]]:
    folder = tmp_path_factory.mktemp("viewer")
    series = generate_study(
        folder / "study", seed=5, phases="P", rows=64, columns=64, pixel_spacing_mm=6.0, slices=12
    ).series[0]
    headers = sorted(
        (pydicom.dcmread(f) for f in series.files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    return [str(f) for f in series.files], headers


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """A large 'kidney' over slices 2..9 and a small 'tumour' only on slice 7."""
    labels = np.zeros(shape, np.uint8)
    labels[2:10, 16:48, 16:48] = 1
    labels[7, 28:36, 28:36] = 2
    return labels


def _segment_labels() -> list[SegmentLabel]:
    return [
        SegmentLabel(1, "kidney", ANATOMICAL_STRUCTURE, KIDNEY, KIDNEY_RGB),
        SegmentLabel(2, "kidney tumor", ANATOMICAL_STRUCTURE, KIDNEY, TUMOUR_RGB),
    ]


def _options(name: str) -> dict:
    return dict(
        algorithm=Algorithm(name="test", version="1"),
        series_instance_uid=derived_uid(f"viewer-{name}-series"),
        sop_instance_uid=derived_uid(f"viewer-{name}-sop"),
        series_number=99,
        series_description=f"test {name}",
    )


def _colour_count(png: bytes, rgb: tuple[int, int, int]) -> int:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(rgb)).max(axis=2) == 0).sum())


def test_scaled_cielab_turns_back_into_the_colour_that_was_written():
    for rgb in (KIDNEY_RGB, TUMOUR_RGB, (224, 32, 32), (0, 90, 200)):
        assert viewer.cielab_to_rgb(CIELabColor.from_rgb(*rgb).value) == rgb
    with pytest.raises(ValueError, match="three integers"):
        viewer.cielab_to_rgb([1, 2])


@pytest.mark.parametrize("kind", ["SEG", "RTSTRUCT"])
def test_the_viewer_opens_on_the_smallest_label_in_the_pacs_colours(tmp_path, source, kind):
    paths, headers = source
    labels = _labels((len(headers), 64, 64))
    path = tmp_path / f"{kind}.dcm"
    if kind == "SEG":
        write_seg(headers, labels, _segment_labels(), path=path, **_options(kind))
    else:
        write_rtstruct(headers, labels, _segment_labels(), path=path, **_options(kind))
    volume = viewer.load(str(path), paths)
    assert volume.kind == kind and volume.slices == len(headers)
    assert volume.default_slice == 7  # the tumour, not the kidney's largest slice
    legend = {entry["name"]: entry for entry in volume.legend()}
    assert legend["kidney tumor"]["rgb"] == list(TUMOUR_RGB)
    assert legend["kidney"]["rgb"] == list(KIDNEY_RGB)
    voxel_ml = 6.0 * 6.0 * float(headers[0].SliceThickness) / 1000.0
    if kind == "SEG":  # the exact label map: the exact volume
        assert legend["kidney tumor"]["volume_ml"] == pytest.approx(64 * voxel_ml, abs=0.01)
    else:  # filled contours: the same volume within a pixel's rim
        assert legend["kidney tumor"]["volume_ml"] == pytest.approx(64 * voxel_ml, rel=0.6)
    png = viewer.render_slice(volume, volume.default_slice)
    assert _colour_count(png, TUMOUR_RGB) >= 8  # the outline, in the colour itself
    assert _colour_count(viewer.render_slice(volume, 7, overlay=False), TUMOUR_RGB) == 0
    assert _colour_count(viewer.render_slice(volume, 3), TUMOUR_RGB) == 0
    with pytest.raises(IndexError):
        viewer.render_slice(volume, volume.slices)


def test_review_routes_follow_the_roles_and_health_routes_answer(tmp_path, start_node, source):
    from dicom_node.web.users import add_user
    from tests.test_delivery_status import _job_with_result, _routed_study, _runner

    node = start_node(
        **modelless_settings(tmp_path),
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": 9,
                "review": "required",
            }
        ],
        health={"echo_interval_s": 0},
    )
    token = make_users(node)
    add_user(node.db, "rita", PASSWORD, "reviewer")
    from dicom_node.web.users import create_token

    reviewer = {"Authorization": f"Bearer {create_token(node.db, 'rita', 'tests')}"}
    viewer_ = {"Authorization": f"Bearer {create_token(node.db, 'vic', 'tests')}"}
    admin = {"Authorization": f"Bearer {token}"}
    _routed_study(node.db)
    job_id = _job_with_result(node.db, _runner(node.db, dest_review=("pacs",)))
    client = client_for(node)
    from db.models import Result

    with node.db.session() as s:
        result_id = s.scalars(select(Result.id)).one()
    detail = client.get(f"/api/results/{result_id}", headers=viewer_).json()
    assert detail["held_for"] == ["pacs"] and detail["viewable"] is False  # no file on disk
    assert client.post(f"/api/results/{result_id}/approve", headers=viewer_).status_code == 403
    r = client.post(f"/api/results/{result_id}/reject", headers=reviewer, json={"reason": " "})
    assert r.status_code == 422 and "needs a reason" in r.json()["detail"]
    assert client.post(f"/api/jobs/{job_id}/retry", headers=reviewer).status_code == 403
    r = client.post(f"/api/results/{result_id}/approve", headers=reviewer, json={"note": "ok"})
    assert r.status_code == 200 and r.json()["ok"], r.text
    r = client.post(f"/api/results/{result_id}/approve", headers=admin)
    assert r.status_code == 409  # nothing held any more
    wait_until(lambda: _send_state(node) == "failed", 20, "the approved send tried")
    study = client.get(f"/api/studies/{_study_uid(node)}", headers=admin).json()
    assert study["status"]["status"] == "failed" and "file unreadable" in study["status"]["reason"]
    assert study["results"][0]["reviews"][0]["by"] == "rita"
    assert study["dispatches"][0]["carries"] == "tumor SEG on series 3 PORTAL VENOUS"

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] in ("ok", "degraded")
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    for name in (
        "dicom_node_degraded",
        "dicom_node_ready 1.0",
        'dicom_node_destination_up{destination="pacs"}',
        # The approved result's file is not on disk (made up above): its send fails for
        # good at once, and a failed send is a failed study.
        'dicom_node_studies_recent{status="failed"} 1.0',
    ):
        assert name in metrics, name


def _send_state(node) -> str:
    from db.models import Dispatch

    with node.db.session() as s:
        return s.scalars(select(Dispatch.state)).one()


def _study_uid(node) -> str:
    from db.models import Study

    with node.db.session() as s:
        return s.scalars(select(Study.study_uid)).one()


def test_the_preview_of_an_unknown_result_is_404(tmp_path, start_node):
    node = start_node(**modelless_settings(tmp_path))
    token = make_users(node)
    r = client_for(node).get(
        "/api/results/99/preview.png", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    assert not Path(node.settings.data_dir, "previews", "99.png").exists()
