"""Closest-canonical (RAS) voxel order, the way TotalSegmentator feeds its models.

TotalSegmentator reorients every input with nibabel's ``as_closest_canonical`` before
nnU-Net sees it, and its weights were trained on images in that order (array [z, y, x]
with x towards the patient's right, y anterior, z superior). Our volumes keep the DICOM
index order (identity direction: x towards the left, y posterior). A TotalSegmentator
model fed our order would see every patient mirrored left-right and front-back; so its
inputs are permuted / flipped into canonical order here and its output back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Wanted LPS sign of each physical axis (x, y, z) in canonical RAS order.
_RAS_SIGN = (-1.0, -1.0, 1.0)


@dataclass(frozen=True)
class Reorientation:
    """How a [..., z, y, x] array maps to canonical order and back."""

    order: tuple[int, int, int]  # source spatial axis (0=z, 1=y, 2=x) of each new axis
    flips: tuple[bool, bool, bool]  # per new axis

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.order)))
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=lead + axis)
        return np.ascontiguousarray(out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = array
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=lead + axis)
        inverse = np.argsort(self.order)
        return np.ascontiguousarray(
            np.transpose(out, (*range(lead), *(lead + int(a) for a in inverse)))
        )

    def spacing(self, spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(spacing_zyx[a]) for a in self.order)  # type: ignore[return-value]


def canonical_ras(direction: Sequence[float]) -> Reorientation:
    """The reorientation of a volume with this SimpleITK direction (3x3 row-major,
    columns = LPS directions of the x, y, z index axes) to closest-canonical RAS."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    source_of: dict[int, tuple[int, float]] = {}  # physical axis -> (array axis, sign)
    for index_axis in range(3):  # 0 = x (array axis 2), 1 = y, 2 = z
        physical = int(np.argmax(np.abs(d[:, index_axis])))
        if physical in source_of:
            raise ValueError(f"direction {tuple(direction)} is degenerate")
        source_of[physical] = (2 - index_axis, float(np.sign(d[physical, index_axis])))
    # New array axes are [z, y, x] = physical axes 2, 1, 0.
    order = tuple(source_of[p][0] for p in (2, 1, 0))
    flips = tuple(source_of[p][1] != _RAS_SIGN[p] for p in (2, 1, 0))
    return Reorientation(order, flips)  # type: ignore[arg-type]
