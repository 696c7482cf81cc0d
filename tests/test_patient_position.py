"""Issue 13, kind 5: every patient position and stored orientation gives the result of the
head-first supine series, in patient space.

The inputs are the synthetic study re-stored with pydicom as a scanner stores a prone,
feet-first or decubitus patient (``devkit.patient_position``: same anatomy in patient
space, pixels rotated, flipped or transposed, ImageOrientationPatient and
ImagePositionPatient rewritten), or written as NIfTI in other voxel orders. Truth comes
from the phantom at each voxel's LPS centre, taken from the DICOM headers or the NIfTI
affine. Before the fix a head-first prone series scored spleen 0.08, aorta 0.06, IVC 0.0
and kidney_left 0.0 (the kidneys swapped sides): only TotalSegmentator models were turned.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from devkit.patient_position import (
    PATIENT_POSITIONS,
    pixel_positions_lps,
    restore_as,
    restore_series,
)
from devkit.synth import SynthStudy, generate_study
from inference.engine import Engine
from inference.nifti_io import read_nifti, write_mask, write_volume
from inference.orientation import reorientation
from inference.registry import RegistryError, load_registry
from inference.results import Algorithm
from inference.seg_reader import seg_label_map
from inference.seg_writer import build_seg
from inference.volume import Volume, load_series
from kernel.catalog import CropSpec, PipelineSpec
from kernel.settings import REPO_ROOT
from kernel.uids import derived_uid
from tests.geometry_helpers import (
    KIDNEYS,
    TOTALSEG,
    assert_sides,
    dice,
    nifti_positions_lps,
    structure,
    totalseg_scores,
    truth_at,
)
from tests.test_engine_support import registry_file
from tests.web_helpers import make_users

CPU = torch.device("cpu")
SEED = 7  # held out from the stand-ins' training seeds
# Small and fast, still Dice >= 0.97 for every totalseg organ in every position.
GRID = {"rows": 128, "columns": 128, "pixel_spacing_mm": 3.0, "slice_thickness_mm": 3.0}
TOTALSEG_SPEC = PipelineSpec(models=["totalseg"], inputs={"image": ["P"]})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SynthStudy:
    return generate_study(tmp_path_factory.mktemp("study"), seed=SEED, phases="APD", **GRID)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_registry(), CPU)  # the shipped models.yaml and stand-ins


@pytest.fixture(scope="module")
def supine(study: SynthStudy, engine: Engine) -> tuple[Volume, np.ndarray]:
    volume = load_series(study.by_phase("P").files)
    return volume, engine.predict("totalseg", {"image": volume})


def _restored(study: SynthStudy, phase: str, position: str, root: Path) -> Volume:
    series = study.by_phase(phase)
    if position == "HFS":
        return load_series(series.files)
    return load_series(restore_as(series.files, root / f"{position}_{phase}", position))


def test_restored_series_hold_the_same_anatomy(study: SynthStudy, tmp_path: Path) -> None:
    """The test input itself: a prone series' pixels, placed by their own headers, are the
    supine pixels at the same patient positions (the post-processing is exact)."""
    supine = load_series(study.by_phase("P").files)
    prone = _restored(study, "P", "HFP", tmp_path)
    assert tuple(prone.headers[0].ImageOrientationPatient) == (-1, 0, 0, 0, -1, 0)
    assert prone.headers[0].PatientPosition == "HFP"
    assert not np.array_equal(prone.array, supine.array)  # rotated 180 degrees in plane
    index = _supine_index(supine, pixel_positions_lps(prone.headers))
    np.testing.assert_array_equal(prone.array, supine.array[index])


def test_restoring_out_of_the_image_plane_is_refused(study: SynthStudy, tmp_path: Path) -> None:
    files = study.by_phase("P").files[:1]
    with pytest.raises(ValueError, match="not \\+- a row or column direction"):
        restore_series(files, tmp_path, row_direction=(0, 0, 1), column_direction=(0, 1, 0))


def _supine_index(supine: Volume, positions_lps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Index arrays into the (identity-direction) supine volume of LPS points [..., 3]."""
    xyz = np.rint((positions_lps - np.asarray(supine.origin_lps)) / supine.spacing_zyx[::-1])
    return tuple(xyz[..., a].astype(int) for a in (2, 1, 0))


@pytest.mark.parametrize("position", list(PATIENT_POSITIONS))
def test_every_patient_position_gives_the_supine_result(
    position: str, study: SynthStudy, engine: Engine, supine, tmp_path: Path
) -> None:
    """totalseg on the portal venous series stored as ``position``: the label map, in the
    series' own array order, scores as the supine one against the truth at each voxel's
    patient position, the kidneys on their sides, and it is the supine map voxel for
    voxel in patient space. The eight orientations are every axial one: FFS's is the
    columns flipped alone (-1\\0\\0\\0\\1\\0), FFP's the rows alone, FFDL's rows and
    columns swapped."""
    volume = _restored(study, "P", position, tmp_path)
    label_map = engine.predict("totalseg", {"image": volume})
    assert label_map.shape == volume.shape
    positions = pixel_positions_lps(volume.headers)
    scores = totalseg_scores(label_map, positions, SEED)
    assert min(scores.values()) >= 0.95, scores
    assert_sides(label_map, positions)
    supine_volume, supine_map = supine
    same_place = supine_map[_supine_index(supine_volume, positions)]
    for value, name in TOTALSEG.items():
        assert dice(label_map == value, same_place == value) >= 0.999, (position, name)


# pipeline -> (spec, input role -> (phase, stored position), {label value: structures})
PIPELINES = {
    "tumor": (
        PipelineSpec(models=["tumor"], inputs={"image": ["P"]},
                     crop=CropSpec(to_model="totalseg", labels=list(KIDNEYS), margin_mm=20)),
        {"image": ("P", "HFP")},
        {1: KIDNEYS, 2: ("kidney_tumor",)},
    ),
    "vessel": (  # the two phases stored differently: P is resampled into A's grid
        PipelineSpec(models=["vessel"], inputs={"A": ["A"], "P": ["P"]}),
        {"A": ("A", "FFP"), "P": ("P", "HFDL")},
        {1: KIDNEYS, 2: ("aorta",), 3: ("inferior_vena_cava",)},
    ),
    "ureter": (
        PipelineSpec(models=["ureter"], inputs={"D": ["D"]}),
        {"D": ("D", "FFDR")},
        {1: ("ureter_left", "ureter_right"), 2: KIDNEYS},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PIPELINES))
def test_every_model_kind_is_turned(
    name: str, study: SynthStudy, engine: Engine, tmp_path: Path, monkeypatch
) -> None:
    """The nnU-Net stand-ins (tumor with its totalseg crop, vessel on two phases stored in
    two positions, ureter): each model is fed exactly the supine image (the voxels of the
    head-first supine series, in its order) and the labels land on the truth at each
    voxel's patient position. (These stand-ins find their labels mostly by HU, so a model
    fed a mirrored image could still pass on the truth alone; its input shows it.)"""
    spec, roles, expected = PIPELINES[name]
    model = engine.registry.get(spec.models[0])
    runner = engine.runner(model.id)
    seen: list[np.ndarray] = []
    real = runner.predict
    monkeypatch.setattr(runner, "predict", lambda c, s: seen.append(c) or real(c, s))
    inputs = {role: _restored(study, p, pos, tmp_path) for role, (p, pos) in roles.items()}
    result = engine.run(name, spec, inputs)
    reference = inputs[next(iter(roles))]  # channel 0 of the model: the reference
    assert result.reference is reference and result.label_map.shape == reference.shape
    positions = pixel_positions_lps(reference.headers)
    truth = truth_at(SEED, positions)
    for value, names in expected.items():
        score = dice(result.label_map == value, structure(truth, *names))
        assert score >= 0.9, (name, names, score)

    (channels,) = seen
    supine = load_series(study.by_phase(roles[model.channels[0]][0]).files)
    block = (slice(None),) * 3
    if result.crop_box is not None:  # the same box in patient space, in supine order
        corners = positions[np.ix_(*[[b.start, b.stop - 1] for b in result.crop_box])]
        index = np.stack(_supine_index(supine, corners)).reshape(3, -1)
        block = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    for c, role in enumerate(model.channels):
        phase_hu = study.by_phase(roles[role][0]).hu.astype(np.float32)[block]
        np.testing.assert_allclose(channels[c], phase_hu, atol=1e-2, err_msg=f"{name} {role}")


@pytest.mark.parametrize("code", ["RAS", "LAS", "PIR"])
def test_nifti_inputs_in_other_voxel_orders(
    code: str, study: SynthStudy, engine: Engine, tmp_path: Path
) -> None:
    """A NIfTI stored RAS, LAS or sagittally (PIR) gives the organs in its own space, and
    the mask carries the input's affine."""
    supine = load_series(study.by_phase("P").files)
    lps_file = write_volume(supine, tmp_path / "lps.nii")
    image = nib.load(str(lps_file))
    turn = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(code))
    )
    source = tmp_path / f"{code}.nii.gz"
    nib.save(image.as_reoriented(turn), str(source))
    assert "".join(nib.aff2axcodes(nib.load(str(source)).affine)) == code

    volume = read_nifti(source)
    label_map = engine.predict("totalseg", {"image": volume})
    mask = write_mask(volume, label_map, tmp_path / f"mask_{code}.nii.gz")
    np.testing.assert_allclose(nib.load(str(mask)).affine, nib.load(str(source)).affine, atol=1e-4)
    labels, positions = nifti_positions_lps(mask)
    scores = totalseg_scores(labels, positions, SEED)
    assert min(scores.values()) >= 0.95, (code, scores)
    assert_sides(labels, positions)


@pytest.mark.parametrize("position", ["HFP", "FFDL"])
def test_seg_frames_stay_on_their_source_slices(
    position: str, study: SynthStudy, engine: Engine, tmp_path: Path
) -> None:
    """The DICOM-SEG of a turned series: every frame references its source slice and sits
    at that slice's position, and read back per source slice it is the label map, right
    side right."""
    volume = _restored(study, "P", position, tmp_path)
    result = engine.run("totalseg", TOTALSEG_SPEC, {"image": volume})
    uid = derived_uid("test-patient-position", position)
    seg = build_seg(
        volume.headers, result.label_map, result.labels,
        algorithm=Algorithm(name="totalseg", version="0.1.0"),
        series_instance_uid=uid, sop_instance_uid=derived_uid(uid, "1"),
        series_number=901, series_description="organs",
        software_versions="0.1.0", device_serial_number="test",
    )  # fmt: skip
    position_of = {h.SOPInstanceUID: [float(v) for v in h.ImagePositionPatient]
                   for h in volume.headers}  # fmt: skip
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        placed = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(placed, position_of[source.ReferencedSOPInstanceUID], atol=1e-3)
    numbers, names = seg_label_map(seg, [h.SOPInstanceUID for h in volume.headers])
    value_of = {lab.name: lab.value for lab in result.labels}
    for number, name in names.items():
        np.testing.assert_array_equal(numbers == number, result.label_map == value_of[name])
    positions = pixel_positions_lps(volume.headers)
    by_name = {name: number for number, name in names.items()}
    left = positions[numbers == by_name["kidney_left"]][:, 0].mean()
    right = positions[numbers == by_name["kidney_right"]][:, 0].mean()
    assert left > 30.0 > -30.0 > right, (left, right)


def test_model_sees_its_declared_orientation(tmp_path: Path, study: SynthStudy) -> None:
    """A model declared ``orientation: RAS`` gets its channels in RAS order (x to the
    patient's right, y anterior) and its output is turned back into the series' order."""
    path = registry_file(tmp_path, ["tumor"], tumor={"orientation": "ras"})
    engine = Engine(load_registry(path), CPU)
    assert engine.registry.get("tumor").orientation == "RAS"
    volume = load_series(study.by_phase("P").files)
    runner = engine.runner("tumor")
    seen: list[np.ndarray] = []
    real = runner.predict

    def predict(channels: np.ndarray, spacing_zyx) -> np.ndarray:
        seen.append(channels)
        out = real(channels, spacing_zyx)
        out[0, 0, 0] = 2  # a marker at the first RAS voxel: the most right-anterior-inferior
        return out

    runner.predict = predict
    label_map = engine.predict("tumor", {"image": volume})
    expected = reorientation(volume.direction, "RAS").to_canonical(volume.array[None])
    np.testing.assert_array_equal(seen[0], expected)
    np.testing.assert_array_equal(seen[0][0], volume.array[:, ::-1, ::-1])  # identity -> RAS
    assert label_map[0, -1, -1] == 2  # back in the series' order: inferior, anterior, right


def test_registry_declares_an_orientation_per_model(tmp_path: Path) -> None:
    registry = load_registry(REPO_ROOT / "models.yaml", check_folders=False)
    assert {spec.orientation for spec in registry.models.values()} == {"LPS"}
    raw = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())
    assert all("orientation" in body for body in raw["models"].values())  # declared, not implied
    body = {k: v for k, v in raw["models"]["tumor"].items() if k != "orientation"}
    ts = {"kind": "totalsegmentator", "task": "total", "version": "1", "labels": body["labels"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"tumor": body, "organs_ts": ts}}))
    defaults = load_registry(path, check_folders=False)
    assert defaults.get("tumor").orientation == "LPS"  # nnunet default
    assert defaults.get("organs_ts").orientation == "RAS"  # TotalSegmentator's order

    path.write_text(yaml.safe_dump({"models": {"tumor": {**body, "orientation": "LPX"}}}))
    with pytest.raises(RegistryError, match=r"model 'tumor' .*orientation.*'LPX' is not"):
        load_registry(path, check_folders=False)
    path.write_text(yaml.safe_dump({"models": {"organs_ts": {**ts, "orientation": "LPS"}}}))
    with pytest.raises(RegistryError, match=r"model 'organs_ts' .*trained in RAS"):
        load_registry(path, check_folders=False)


def test_path_api_prone_and_turned_nifti_match_supine(tmp_path: Path, start_node) -> None:
    """The issue's example on a running node: a head-first prone series (DICOM folder) and
    a feet-first decubitus series written as NIfTI, posted to /inference/totalseg, give
    masks in their own space that score as the supine series' mask, kidneys not swapped."""
    node = start_node(path_api={"allowed_roots": [tmp_path]})  # the path API reads here
    token = make_users(node)
    study = generate_study(tmp_path / "study", seed=SEED, phases="P", **GRID)
    files = study.by_phase("P").files
    prone = restore_as(files, tmp_path / "HFP", "HFP")
    decubitus = write_volume(
        load_series(restore_as(files, tmp_path / "FFDL", "FFDL")), tmp_path / "ffdl.nii.gz"
    )
    bodies = {
        "HFS": {"image_path": str(files[0].parent)},
        "HFP": {"image_path": str(prone[0].parent)},
        "FFDL NIfTI": {"image_path": str(decubitus)},
    }
    scores = {}
    with httpx.Client(
        base_url=f"http://127.0.0.1:{node.web_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=600,
    ) as client:
        for name, body in bodies.items():
            r = client.post("/inference/totalseg", json=body)
            assert r.status_code == 200, (name, r.text)
            labels, positions = nifti_positions_lps(Path(r.json()["mask_path"]))
            scores[name] = totalseg_scores(labels, positions, SEED)
            assert_sides(labels, positions)
    for name, per_structure in scores.items():
        assert min(per_structure.values()) >= 0.95, (name, per_structure)
        for structure_name, value in per_structure.items():
            assert abs(value - scores["HFS"][structure_name]) <= 0.01, (name, structure_name)
