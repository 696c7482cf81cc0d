"""Closest-canonical (RAS) reorientation, as TotalSegmentator feeds its models."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inference.orientation import canonical_ras

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
