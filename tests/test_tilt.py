"""Issue 13, kind 8: gantry-tilted (sheared) stacks: every NIfTI voxel where the DICOM
puts its pixel.

A tilted helical CT steps its slices along the table (z) while every image plane is tilted
about the patient's left-right axis, so the step between slices is not the plane normal.
The DICOM-SEG was always right (each frame on its source slice); the NIfTI mask was
written on the normal, putting the last slice of a 15 degree stack ~55 mm from its DICOM
position. Inputs are ``devkit.synth`` series with ``gantry_tilt_deg`` (the phantom sampled
on the tilted pixels); positions are checked against ImagePositionPatient +
ImageOrientationPatient * PixelSpacing of the first, middle and last slices.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from devkit.patient_position import pixel_positions_lps
from devkit.synth import SynthStudy, generate_study, write_truth_nifti
from inference.engine import Engine, PipelineInputError
from inference.nifti_io import read_nifti, write_mask, write_volume
from inference.orientation import StackGeometryError, stack_geometry
from inference.registry import load_registry
from inference.volume import Volume, load_series, resample_to
from kernel.catalog import PipelineSpec
from tests.geometry_helpers import (
    KIDNEYS,
    assert_sides,
    dice,
    nifti_positions_lps,
    structure,
    totalseg_scores,
    truth_at,
)
from tests.web_helpers import make_users

CPU = torch.device("cpu")
SEED = 7
TINY = {"rows": 48, "columns": 40, "pixel_spacing_mm": 8.0, "slice_thickness_mm": 5.0}
GRID = {"rows": 128, "columns": 128, "pixel_spacing_mm": 3.0, "slice_thickness_mm": 3.0}
TOLERANCE_MM = 0.1


def _tilted(root: Path, tilt_deg: float, phases: str = "P", **grid: float) -> SynthStudy:
    return generate_study(root, seed=SEED, phases=phases, gantry_tilt_deg=tilt_deg,
                          **(grid or TINY))  # fmt: skip


def _dicom_pixel_mm(ds: pydicom.Dataset, column: int, row: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1: ImagePositionPatient + column * column spacing * row cosines +
    row * row spacing * column cosines."""
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + column * column_spacing * iop[:3] + row * row_spacing * iop[3:]


def assert_voxels_on_dicom_pixels(nifti: Path, headers: list[pydicom.Dataset]) -> None:
    """Every voxel centre of the first, middle and last slice (nibabel's affine) is the
    DICOM position of its pixel within 0.1 mm."""
    affine = nib.load(str(nifti)).affine
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    r, c = np.mgrid[0:rows, 0:columns]
    for k in (0, len(headers) // 2, len(headers) - 1):
        ijk1 = np.stack([c, r, np.full_like(c, k), np.ones_like(c)], axis=-1).astype(float)
        placed = (ijk1 @ affine.T)[..., :3] * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
        dicom = pixel_positions_lps([headers[k]])[0]
        off = float(np.max(np.linalg.norm(placed - dicom, axis=-1)))
        assert off <= TOLERANCE_MM, f"slice {k}: voxels {off:.2f} mm from their DICOM pixels"
        corner = _dicom_pixel_mm(headers[k], columns - 1, rows - 1)  # the formula itself
        np.testing.assert_allclose(placed[-1, -1], corner, atol=TOLERANCE_MM)


def test_tilted_synthetic_series_is_a_sheared_stack(tmp_path: Path) -> None:
    """The generator's tilted series: tilted planes, slices stepping along the table (z)
    only, and its truth is the phantom at each pixel's DICOM position."""
    series = _tilted(tmp_path / "study", -12.0).series[0]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    t = np.deg2rad(-12.0)
    np.testing.assert_allclose(
        [float(v) for v in headers[0].ImageOrientationPatient],
        (1, 0, 0, 0, np.cos(t), np.sin(t)), atol=1e-9,
    )  # fmt: skip
    steps = np.diff([[float(v) for v in h.ImagePositionPatient] for h in headers], axis=0)
    np.testing.assert_allclose(steps, [[0.0, 0.0, TINY["slice_thickness_mm"]]] * len(steps))
    assert float(headers[0].GantryDetectorTilt) == -12.0
    np.testing.assert_array_equal(truth_at(SEED, pixel_positions_lps(headers)), series.truth)
    with pytest.raises(ValueError, match="gantry tilt"):
        write_truth_nifti(series, tmp_path / "truth.nii.gz")


@pytest.mark.parametrize("tilt_deg", [15.0, -15.0, 25.0, -7.5, 30.0, 0.0])
def test_nifti_mask_voxels_sit_on_their_dicom_pixels(tilt_deg: float, tmp_path: Path) -> None:
    series = _tilted(tmp_path / "study", tilt_deg).series[0]
    volume = load_series(series.files)
    assert float(volume.headers[0].GantryDetectorTilt) == tilt_deg
    label_map = np.zeros(volume.shape, np.uint8)
    label_map[:, 3:9, 5:12] = 4
    mask = write_mask(volume, label_map, tmp_path / "mask.nii.gz")
    assert_voxels_on_dicom_pixels(mask, volume.headers)
    labels, _ = nifti_positions_lps(mask)
    np.testing.assert_array_equal(labels, label_map)  # voxel (x, y, z) = pixel of slice z
    image = nib.load(str(mask))
    if tilt_deg:
        # The shear lives in the sform; no qform (a rotation) a reader could fall back to.
        assert image.header.get_qform(coded=True)[1] == 0
        assert int(image.header["sform_code"]) == 1
        assert f"gantry tilt {abs(tilt_deg):.2f}" in image.header["descrip"].item().decode()
        # ITK cannot hold a shear: it refuses the file rather than misplacing it.
        with pytest.raises(RuntimeError, match="orthonormal"):
            sitk.ReadImage(str(mask))
    # Our own reader places every voxel as the affine does (shear kept).
    back = read_nifti(mask)
    np.testing.assert_array_equal(back.array, label_map)
    last = (volume.shape[2] - 1, volume.shape[1] - 1, volume.shape[0] - 1)
    where = np.array(back.to_sitk().TransformIndexToPhysicalPoint(last))
    np.testing.assert_allclose(where, _dicom_pixel_mm(volume.headers[-1], *last[:2]), atol=0.1)


def test_simpleitk_geometry_misses_the_shear(tmp_path: Path) -> None:
    """Why the headers are read: the volume SimpleITK builds puts the slices on the plane
    normal, the last one tens of mm from its DICOM position (the issue's ~54 mm)."""
    volume = load_series(_tilted(tmp_path / "study", 15.0, **GRID).series[0].files)
    n = volume.shape[0] - 1
    normal_based = np.array(volume.to_sitk().TransformIndexToPhysicalPoint((0, 0, n)))
    off_mm = float(np.linalg.norm(normal_based - _dicom_pixel_mm(volume.headers[-1], 0, 0)))
    assert off_mm > 40.0
    placed = stack_geometry(volume)
    np.testing.assert_allclose(
        placed.to_sitk().TransformIndexToPhysicalPoint((0, 0, n)),
        _dicom_pixel_mm(volume.headers[-1], 0, 0),
        atol=1e-3,
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_registry(), CPU)


@pytest.mark.parametrize("tilt_deg", [15.0, -20.0])
def test_masks_nifti_from_the_dicom_path(tilt_deg: float, engine: Engine, tmp_path: Path) -> None:
    """``masks: nifti`` (Engine.run with a mask folder, as a DICOM job runs it): the organs
    are found on the tilted pixels and the NIfTI places them where the DICOM does."""
    series = _tilted(tmp_path / "study", tilt_deg, **GRID).series[0]
    volume = load_series(series.files)
    spec = PipelineSpec(models=["totalseg"], inputs={"image": ["P"]}, masks="nifti")
    result = engine.run("totalseg", spec, {"image": volume}, mask_dir=tmp_path / "masks")
    assert result.mask_path is not None
    assert_voxels_on_dicom_pixels(result.mask_path, volume.headers)
    labels, positions = nifti_positions_lps(result.mask_path)
    np.testing.assert_array_equal(labels, result.label_map)
    scores = totalseg_scores(labels, positions, SEED)
    assert min(scores.values()) >= 0.95, scores
    assert_sides(labels, positions)
    # The same scores against the generator's own truth on the tilted pixels.
    for value, name in ((3, "kidney_left"), (4, "liver")):
        assert dice(result.label_map == value, structure(series.truth, name)) >= 0.95


def test_secondary_phase_is_resampled_through_the_shear(engine: Engine, tmp_path: Path) -> None:
    """vessel (A + P): P tilted the other way and shifted is resampled into A's sheared
    grid by where the headers put both; the truth lands on A's truth and the model scores
    as on untilted series."""
    geometry = {"A": {"gantry_tilt_deg": 15.0},
                "P": {"gantry_tilt_deg": -10.0, "xy_offset_mm": 6.0}}  # fmt: skip
    study = generate_study(tmp_path / "study", seed=SEED, phases="AP", geometry=geometry, **GRID)
    a, p = (load_series(study.by_phase(x).files) for x in "AP")
    # Truth of P carried into A's grid (nearest) agrees with A's truth where P covers it
    # (0.94-0.99 on 3 mm voxels; on SimpleITK's normal-based geometry 0.0-0.4).
    p_truth = Volume(study.by_phase("P").truth.astype(np.float32), p.spacing_zyx, p.origin_lps,
                     p.direction, headers=p.headers)  # fmt: skip
    carried = _nearest(stack_geometry(p_truth), stack_geometry(a))
    covered = carried >= 0
    a_truth = study.by_phase("A").truth
    for name in ("liver", "spleen", "aorta", "inferior_vena_cava", *KIDNEYS):
        got = structure(carried.astype(np.uint8), name) & covered
        assert dice(got, structure(a_truth, name) & covered) >= 0.9, name

    # Both tilted alike but shifted: every voxel of A is covered by P.
    geometry = {"A": {"gantry_tilt_deg": 15.0},
                "P": {"gantry_tilt_deg": 15.0, "xy_offset_mm": 6.0}}  # fmt: skip
    study = generate_study(tmp_path / "alike", seed=SEED, phases="AP", geometry=geometry, **GRID)
    a, p = (load_series(study.by_phase(x).files) for x in "AP")
    label_map = engine.predict("vessel", {"A": a, "P": p})
    truth = study.by_phase("A").truth
    for value, names in ((1, KIDNEYS), (2, ("aorta",)), (3, ("inferior_vena_cava",))):
        assert dice(label_map == value, structure(truth, *names)) >= 0.9, names


def _nearest(moving: Volume, reference: Volume) -> np.ndarray:
    """``moving`` (labels) resampled nearest-neighbour into ``reference``; -1 outside."""
    out = sitk.Resample(moving.to_sitk(), reference.to_sitk(), sitk.Transform(),
                        sitk.sitkNearestNeighbor, -1.0, sitk.sitkFloat32)  # fmt: skip
    return sitk.GetArrayFromImage(out)


def test_resample_to_follows_the_sheared_geometry(tmp_path: Path) -> None:
    """``resample_to`` (what the engine uses for secondary channels) on two stack
    geometries: HU of P at A's liver and aorta are P's own, not shifted tissue."""
    study = generate_study(tmp_path / "study", seed=SEED, phases="AP", **GRID,
                           geometry={"A": {"gantry_tilt_deg": 20.0}})  # fmt: skip
    a, p = (load_series(study.by_phase(x).files) for x in "AP")
    p_in_a = resample_to(stack_geometry(p), stack_geometry(a))
    a_truth, p_truth = study.by_phase("A").truth, study.by_phase("P").truth
    inside = p_in_a > -1000  # P covers a shorter z range than A's tilted planes
    for name in ("liver", "aorta"):
        own = float(p.array[structure(p_truth, name)].mean())
        core = structure(a_truth, name) & inside
        assert abs(float(np.median(p_in_a[core])) - own) < 15.0, name


def test_uneven_stack_is_refused_naming_the_series(engine: Engine, tmp_path: Path) -> None:
    """Slices off one straight line (one slice shifted 1.5 mm sideways, which the slice
    sort along the normal does not see): no affine can place them, so inference and the
    NIfTI writer refuse with the series and the reason."""
    series = _tilted(tmp_path / "study", 15.0).series[0]
    middle = series.files[len(series.files) // 2]
    ds = pydicom.dcmread(middle)
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 1.5,
                               *ds.ImagePositionPatient[1:]]  # fmt: skip
    ds.save_as(middle)
    volume = load_series(series.files)
    with pytest.raises(PipelineInputError, match=rf"{volume.series_uid}.*straight line"):
        engine.predict("totalseg", {"image": volume})
    with pytest.raises(StackGeometryError, match="straight line"):
        write_mask(volume, np.zeros(volume.shape, np.uint8), tmp_path / "mask.nii.gz")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_path_api_tilted_series_and_sheared_nifti(tmp_path: Path, start_node) -> None:
    """On a running node: a 15 degree tilted DICOM folder and the same series as a sheared
    NIfTI, posted to /inference/totalseg, give masks whose voxels sit on the DICOM pixels
    and whose organs are the phantom's at those positions."""
    node = start_node(path_api={"allowed_roots": [tmp_path]})  # the path API reads here
    token = make_users(node)
    series = _tilted(tmp_path / "study", 15.0, **GRID).series[0]
    volume = load_series(series.files)
    sheared = write_volume(volume, tmp_path / "tilted.nii.gz")
    with httpx.Client(
        base_url=f"http://127.0.0.1:{node.web_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=600,
    ) as client:
        for source in (series.files[0].parent, sheared):
            r = client.post("/inference/totalseg", json={"image_path": str(source)})
            assert r.status_code == 200, (source, r.text)
            mask = Path(r.json()["mask_path"])
            assert_voxels_on_dicom_pixels(mask, volume.headers)
            labels, positions = nifti_positions_lps(mask)
            scores = totalseg_scores(labels, positions, SEED)
            assert min(scores.values()) >= 0.95, (source, scores)
            assert_sides(labels, positions)
            truth = truth_at(SEED, pixel_positions_lps(volume.headers))
            assert dice(labels == 4, structure(truth, "liver")) >= 0.95
