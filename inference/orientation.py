"""Where a voxel grid lies in patient space, and the voxel order a model was trained in.

Two jobs that both follow from the DICOM geometry (PS3.3 C.7.6.2.1.1: ImagePositionPatient
is the centre of the first pixel, ImageOrientationPatient the LPS direction cosines of a
row and of a column):

- ``reorientation(direction, "LPS")``: the transpose / flips that bring an array into the
  voxel order a model was trained in, and back. Orientation codes name the patient
  direction each index axis runs towards, x first (nibabel's convention): the shipped
  stand-ins were trained on head-first supine axial DICOM order, ``LPS`` (x to the
  patient's left, y posterior, z superior); TotalSegmentator feeds its models nibabel's
  ``as_closest_canonical``, ``RAS``. A prone, feet-first or decubitus series, or any
  in-plane flip, becomes the same picture of the patient as the one the model learnt on;
  the label map is turned back, so it stays in the series' own array order (the order of
  ``Volume.headers``, which the DICOM-SEG frames follow).
- ``stack_geometry(volume)``: the affine the slice headers really describe. A gantry-tilted
  CT stacks its slices along the table (z) while each image plane is tilted, so the step
  from one slice to the next is not the plane normal: the grid is sheared. SimpleITK puts
  the slices on the normal; the headers say where they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from inference.volume import Volume

# Orientation letter -> (LPS physical axis, sign of the LPS coordinate along it).
_LETTERS = {
    "L": (0, 1.0),
    "R": (0, -1.0),
    "P": (1, 1.0),
    "A": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}
# A geometry is orthogonal when the axes' cosines differ from 0 by less than this.
ORTHOGONAL_TOLERANCE = 1e-4
# Slices whose ImagePositionPatient lies farther than this from the one-affine line are
# not one regular (possibly sheared) grid: no single affine places them. A quarter of a
# millimetre, or a tenth of the slice step when that is more: far above the rounding of
# positions written with one decimal, far below a voxel.
LINE_TOLERANCE_MM = 0.25
LINE_TOLERANCE_STEPS = 0.1


class StackGeometryError(ValueError):
    """The slices of a series do not form one regular grid; the message names the series."""


def check_orientation(code: str) -> str:
    """``code`` upper-cased if it is an orientation code (one letter of L/R, A/P and S/I
    each, x axis first: ``LPS``, ``RAS``, ``LAS`` ...); raises ``ValueError`` otherwise."""
    value = str(code).strip().upper()
    axes = sorted(_LETTERS[c][0] for c in value if c in _LETTERS)
    if len(value) != 3 or axes != [0, 1, 2]:
        raise ValueError(
            f"orientation {code!r} is not an orientation code: one letter each of L/R, A/P "
            "and S/I, x axis first (e.g. LPS, RAS)"
        )
    return value


@dataclass(frozen=True)
class Reorientation:
    """How a [..., z, y, x] array maps to a model's voxel order and back."""

    order: tuple[int, int, int]  # source spatial axis (0=z, 1=y, 2=x) of each new axis
    flips: tuple[bool, bool, bool]  # per new axis

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """``array`` [..., z, y, x] in the target voxel order (a contiguous copy)."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.order)))
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=lead + axis)
        return np.ascontiguousarray(out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """The inverse of ``to_canonical``: back to the source array order."""
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
        """Source spacing (mm, z y x) in the target voxel order."""
        return tuple(float(spacing_zyx[a]) for a in self.order)  # type: ignore[return-value]


def reorientation(direction: Sequence[float], target: str = "RAS") -> Reorientation:
    """The transpose and flips that bring a volume with this direction into ``target``.

    ``direction``: 3x3 row-major, SimpleITK convention (columns = LPS unit vectors of the
    x, y, z index axes; a sheared stack's slice axis is its stacking direction).
    ``target``: orientation code of the wanted voxel order (``check_orientation``). Each
    index axis goes to the patient axis it is closest to, largest cosine first, so an
    oblique or tilted grid gets the nearest axis-aligned order (as nibabel's
    ``io_orientation``); raises ``ValueError`` for a singular direction.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if abs(np.linalg.det(d)) < 1e-6:
        raise ValueError(f"direction {tuple(direction)} is degenerate")
    target = check_orientation(target)
    weights = np.abs(d).copy()  # [physical axis, index axis]
    source_of: dict[int, tuple[int, float]] = {}  # physical axis -> (array axis, sign)
    for _ in range(3):
        physical, index_axis = np.unravel_index(int(np.argmax(weights)), weights.shape)
        source_of[int(physical)] = (2 - int(index_axis), float(np.sign(d[physical, index_axis])))
        weights[physical, :] = -1.0
        weights[:, index_axis] = -1.0
    # New array axes are [z, y, x]: the physical axes of target letters 2, 1, 0.
    wanted = [_LETTERS[target[i]] for i in (2, 1, 0)]
    order = tuple(source_of[p][0] for p, _ in wanted)
    flips = tuple(source_of[p][1] != sign for p, sign in wanted)
    return Reorientation(order, flips)  # type: ignore[arg-type]


def canonical_ras(direction: Sequence[float]) -> Reorientation:
    """The reorientation to closest-canonical RAS (TotalSegmentator's voxel order)."""
    return reorientation(direction, "RAS")


# --- the stack's own affine -----------------------------------------------------------


def is_orthogonal(direction: Sequence[float]) -> bool:
    """Whether the index axes of this direction (3x3, columns = axes) are orthogonal."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(d.T @ d, np.eye(3), atol=ORTHOGONAL_TOLERANCE))


def plane_spacing_mm(volume: Volume) -> float:
    """Distance between adjacent image planes (mm) along their normal.

    Equal to the slice spacing for an orthogonal grid; ``spacing * cos(tilt)`` for a
    gantry-tilted stack, whose table increment is longer than the plane distance.
    """
    if is_orthogonal(volume.direction):
        return float(volume.spacing_zyx[0])
    d = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    normal /= np.linalg.norm(normal)
    return float(abs(normal @ d[:, 2]) * volume.spacing_zyx[0])


def stack_geometry(volume: Volume) -> Volume:
    """``volume`` with the geometry its slice headers describe (same array, no copy).

    From ``volume.headers`` (sorted as ``array[z]``): origin = ImagePositionPatient of the
    first slice; x and y axes = ImageOrientationPatient row and column cosines with
    PixelSpacing (row spacing = y, column spacing = x, PS3.3 C.7.6.2.1.1); the slice axis
    = the step between ImagePositionPatient of adjacent slices. For a gantry-tilted
    (sheared) stack that step is not the plane normal, and ``direction`` is then not
    orthogonal (unit columns, SimpleITK convention). Volumes without one header per slice
    (NIfTI, crops, one slice) are returned as they are.

    Raises ``StackGeometryError`` naming the series when the slices do not lie on one
    line at even steps (within ``LINE_TOLERANCE_MM`` or ``LINE_TOLERANCE_STEPS`` of the
    step, whichever is more): no single affine places them.
    """
    headers = volume.headers
    if len(headers) < 2 or len(headers) != volume.shape[0]:
        return volume
    first = headers[0]
    if "ImageOrientationPatient" not in first or "PixelSpacing" not in first:
        return volume
    if (int(first.Rows), int(first.Columns)) != volume.shape[1:]:
        return volume
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cos = iop[:3] / np.linalg.norm(iop[:3])
    column_cos = iop[3:] / np.linalg.norm(iop[3:])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    if not (np.isfinite(positions).all() and np.isfinite([*row_cos, *column_cos]).all()):
        # inference.stacks refuses such headers before a volume is read; NaN would pass
        # every comparison below.
        raise StackGeometryError(f"series {volume.series_uid}: a slice position is not finite")
    n = len(positions)
    step = (positions[-1] - positions[0]) / (n - 1)
    step_mm = float(np.linalg.norm(step))
    if step_mm < 1e-6:
        raise StackGeometryError(f"series {volume.series_uid}: all slices share one position")
    expected = positions[0] + np.arange(n)[:, None] * step
    off_mm = float(np.max(np.linalg.norm(positions - expected, axis=1)))
    if off_mm > max(LINE_TOLERANCE_MM, LINE_TOLERANCE_STEPS * step_mm):
        raise StackGeometryError(
            f"series {volume.series_uid}: slice positions are {off_mm:.2f} mm off one straight "
            "line at even steps (uneven spacing or a varying tilt); no single affine places "
            "its voxels"
        )
    direction = np.column_stack([row_cos, column_cos, step / step_mm])
    return replace(
        volume,
        spacing_zyx=(step_mm, row_spacing, column_spacing),
        origin_lps=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )


def tilt_deg(direction: Sequence[float]) -> float:
    """Angle (degrees) between the slice axis and the image plane normal: the gantry tilt
    of a sheared stack, 0 for an orthogonal grid."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    normal /= np.linalg.norm(normal)
    cos = abs(float(normal @ d[:, 2])) / float(np.linalg.norm(d[:, 2]))
    return float(np.degrees(np.arccos(min(1.0, cos))))
