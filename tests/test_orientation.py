"""Reorientation into a model's voxel order (closest canonical RAS as TotalSegmentator feeds
its models, or any declared order) and the sheared affine of a gantry-tilted stack."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.orientation import (
    StackGeometryError,
    canonical_ras,
    check_orientation,
    is_orthogonal,
    plane_spacing_mm,
    reorientation,
    stack_geometry,
    tilt_deg,
)
from inference.volume import Volume

DIRECTIONS = {
    "axial (identity)": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "axial, feet first flipped z": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "coronal": (1, 0, 0, 0, 0, -1, 0, 1, 0),
    "sagittal": (0, 0, -1, 1, 0, 0, 0, -1, 0),
}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_canonical_order_runs_right_anterior_superior_and_back(name):
    direction = DIRECTIONS[name]
    shape = (3, 4, 5)
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    turn = canonical_ras(direction)
    canon = turn.to_canonical(array)
    np.testing.assert_array_equal(turn.from_canonical(canon), array)
    # Each canonical axis moves the physical position towards S (axis 0), A (1), R (2).
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(float(d) for d in direction))

    def position(value: float) -> np.ndarray:
        z, y, x = (int(v) for v in np.argwhere(array == value)[0])
        return np.array(image.TransformIndexToPhysicalPoint((x, y, z)))  # LPS

    corner = position(canon[0, 0, 0])
    towards = {0: np.array([0, 0, 1.0]), 1: np.array([0, -1.0, 0]), 2: np.array([-1.0, 0, 0])}
    for axis, unit in towards.items():
        step = [0, 0, 0]
        step[axis] = 1
        moved = position(canon[tuple(step)]) - corner
        assert np.allclose(moved / np.linalg.norm(moved), unit), (name, axis, moved)
    spacing = turn.spacing((2.5, 0.7, 0.8))
    assert sorted(spacing) == sorted((2.5, 0.7, 0.8))


def test_degenerate_direction_is_refused():
    with pytest.raises(ValueError, match="degenerate"):
        canonical_ras((1, 0, 0, 1, 0, 0, 0, 0, 1))


# --- any target order (a model's declared orientation) ------------------------------

TOWARDS = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1),
           "I": (0, 0, -1)}  # fmt: skip
DECUBITUS_FEET_FIRST = (0, 1, 0, 1, 0, 0, 0, 0, -1)  # FFDL: x posterior, y left, z inferior


@pytest.mark.parametrize("target", ["LPS", "RAS", "LAS", "PIR", "SAL"])
@pytest.mark.parametrize("name", [*DIRECTIONS, "decubitus feet first"])
def test_reorientation_runs_each_axis_towards_its_letter(name: str, target: str) -> None:
    direction = DIRECTIONS.get(name, DECUBITUS_FEET_FIRST)
    shape = (3, 4, 5)
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    turn = reorientation(direction, target)
    canon = turn.to_canonical(array)
    np.testing.assert_array_equal(turn.from_canonical(canon), array)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(float(d) for d in direction))

    def position(value: float) -> np.ndarray:
        z, y, x = (int(v) for v in np.argwhere(array == value)[0])
        return np.array(image.TransformIndexToPhysicalPoint((x, y, z)))

    corner = position(canon[0, 0, 0])
    for axis in range(3):  # canonical array axis 0 = z (target[2]), 1 = y, 2 = x
        step = [0, 0, 0]
        step[axis] = 1
        moved = position(canon[tuple(step)]) - corner
        wanted = np.array(TOWARDS[target[2 - axis]], float)
        assert np.allclose(moved / np.linalg.norm(moved), wanted), (name, target, axis)


def test_orientation_codes_are_checked() -> None:
    assert check_orientation(" las ") == "LAS"
    for bad in ("LPX", "LLS", "LP", "RASS", ""):
        with pytest.raises(ValueError, match="not an orientation code"):
            check_orientation(bad)


def test_oblique_axes_go_to_their_nearest_patient_axis() -> None:
    """A 45 degree in-plane rotation ties two cosines: each index axis still gets its own
    patient axis (largest cosine first), as nibabel's io_orientation assigns them."""
    c = float(np.cos(np.pi / 4))
    turn = reorientation((c, -c, 0, c, c, 0, 0, 0, 1), "LPS")
    assert sorted(turn.order) == [0, 1, 2]
    tilted = reorientation((1, 0, 0, 0, 0.966, 0, 0, 0.259, 1), "LPS")  # sheared, 15 degrees
    assert tilted.identity


# --- the stack's own affine ------------------------------------------------------------


def _headers(positions, iop=(1, 0, 0, 0, 1, 0), rows=4, columns=5):
    out = []
    for p in positions:
        ds = pydicom.Dataset()
        ds.ImagePositionPatient = [float(v) for v in p]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [2.0, 3.0]  # between rows (y), between columns (x)
        ds.Rows, ds.Columns = rows, columns
        out.append(ds)
    return out


def _volume(headers, spacing_z=5.0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Volume:
    array = np.zeros((len(headers), int(headers[0].Rows), int(headers[0].Columns)), np.float32)
    origin = tuple(float(v) for v in headers[0].ImagePositionPatient)
    return Volume(array, (spacing_z, 2.0, 3.0), origin, direction, "1.2.3", headers=headers)


def test_stack_geometry_takes_the_slice_step_from_the_headers() -> None:
    t = np.deg2rad(20.0)
    iop = (1, 0, 0, 0, float(np.cos(t)), float(np.sin(t)))
    positions = [(0.0, 0.0, 4.0 * k) for k in range(6)]
    normal = np.cross(iop[:3], iop[3:])
    itk_like = (1, 0, 0, 0, iop[4], normal[1], 0, iop[5], normal[2])
    volume = _volume(_headers(positions, iop), spacing_z=4.0, direction=itk_like)
    placed = stack_geometry(volume)
    assert placed.array is volume.array and placed.headers is volume.headers
    assert not is_orthogonal(placed.direction)
    np.testing.assert_allclose(np.reshape(placed.direction, (3, 3))[:, 2], (0, 0, 1))
    assert placed.spacing_zyx == pytest.approx((4.0, 2.0, 3.0))
    assert tilt_deg(placed.direction) == pytest.approx(20.0)
    assert plane_spacing_mm(placed) == pytest.approx(4.0 * np.cos(t))
    image = placed.to_sitk()
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((4, 3, 5)),
                               np.array(positions[5]) + 4 * 3.0 * np.array(iop[:3])
                               + 3 * 2.0 * np.array(iop[3:]), atol=1e-9)  # fmt: skip
    # An orthogonal stack keeps its geometry; volumes without headers are left alone.
    straight = stack_geometry(_volume(_headers([(0, 0, 5.0 * k) for k in range(3)])))
    assert is_orthogonal(straight.direction) and tilt_deg(straight.direction) == 0.0
    bare = Volume(np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0), (0, 0, 0),
                  (1, 0, 0, 0, 1, 0, 0, 0, 1))  # fmt: skip
    assert stack_geometry(bare) is bare


def test_stack_off_one_line_is_refused() -> None:
    positions = [(0.0, 0.0, 5.0 * k) for k in range(5)]
    positions[2] = (0.8, 0.0, 10.0)
    with pytest.raises(StackGeometryError, match=r"series 1\.2\.3: .*0\.80 mm off one straight"):
        stack_geometry(_volume(_headers(positions)))


def test_positions_rounded_to_a_tenth_of_a_millimetre_still_form_one_grid() -> None:
    """Scanners that write ImagePositionPatient with one decimal: a tilted stack's lateral
    steps then wobble by rounding, which is not a reason to refuse it."""
    t = np.deg2rad(12.0)
    iop = (1, 0, 0, 0, float(np.cos(t)), float(np.sin(t)))
    positions = [
        (-200.0, round(-180.0 - 0.37 * k, 1), round(-90.0 + 2.5 * k, 1)) for k in range(40)
    ]
    placed = stack_geometry(_volume(_headers(positions, iop), spacing_z=2.5))
    image = placed.to_sitk()
    for k in (0, 20, 39):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), positions[k],
                                   atol=0.1)  # fmt: skip
