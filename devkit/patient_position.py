"""A synthetic series re-stored as another patient position or in-plane orientation.

A scanner stores the pixels of a prone, feet-first or decubitus patient with another
ImageOrientationPatient: the anatomy in patient (LPS) space is the same, the pixel array is
rotated, flipped or transposed. ``restore_series`` rewrites a ``devkit.synth`` series that
way with pydicom, exactly (a signed permutation of the pixels, no interpolation), so a test
can check that every position gives the same result in patient space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# ImageOrientationPatient (row direction, column direction; LPS) of an axial series for
# each PatientPosition (PS3.3 C.7.3.1.1.2): the row runs towards the gantry's left as the
# viewer faces it, the column towards the floor.
PATIENT_POSITIONS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
    "HFDL": ((0, -1, 0), (1, 0, 0)),
    "HFDR": ((0, 1, 0), (-1, 0, 0)),
    "FFDL": ((0, 1, 0), (1, 0, 0)),
    "FFDR": ((0, -1, 0), (-1, 0, 0)),
}


def restore_series(
    files: Sequence[Path],
    out_dir: Path,
    *,
    row_direction: Sequence[int],
    column_direction: Sequence[int],
    patient_position: str | None = None,
    tag: str = "",
) -> list[Path]:
    """Write ``files`` (one axis-aligned series) into ``out_dir`` as the same anatomy stored
    with ImageOrientationPatient ``row_direction`` + ``column_direction``.

    Both directions are LPS unit vectors in the plane of the source images (each one of
    +-its row or column direction). Per slice: the pixels are permuted / flipped to the new
    orientation, Rows, Columns, PixelSpacing, ImageOrientationPatient and
    ImagePositionPatient (the centre of the new first pixel) rewritten; the z of every
    slice is kept. ``patient_position`` sets PatientPosition. Series and SOP Instance UIDs
    are derived from the source's and ``tag`` (default: the position or the directions),
    so a re-stored series is a new series. Compressed sources are written uncompressed.
    Returns the new files in the order of ``files``; raises ``ValueError`` when a direction
    is not in the source's image plane.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h_new = np.asarray(row_direction, dtype=float)
    d_new = np.asarray(column_direction, dtype=float)
    tag = tag or patient_position or f"{tuple(row_direction)}{tuple(column_direction)}"
    written: list[Path] = []
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        h_old, d_old = iop[:3], iop[3:]
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)  # between rows, columns
        # New row / column direction in the old basis: (old-column step, old-row step).
        a, b = _in_plane(h_new, h_old, d_old)
        e, f = _in_plane(d_new, h_old, d_old)
        if abs(a) == abs(e):
            raise ValueError("row and column directions must be orthogonal")
        old = ds.pixel_array
        rows_old, cols_old = old.shape
        cols_new = cols_old if a else rows_old
        rows_new = rows_old if f else cols_old
        r, c = np.mgrid[0:rows_new, 0:cols_new]
        i_step, j_step = c * a + r * e, c * b + r * f
        i0 = -int(i_step.min())
        j0 = -int(j_step.min())
        new = old[j0 + j_step, i0 + i_step]
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        ipp = ipp + i0 * col_sp * h_old + j0 * row_sp * d_old
        ds.Rows, ds.Columns = int(rows_new), int(cols_new)
        ds.PixelSpacing = [
            f"{col_sp if e else row_sp:g}",  # along the new column direction
            f"{col_sp if a else row_sp:g}",  # along the new row direction
        ]
        ds.ImageOrientationPatient = [f"{v:g}" for v in (*h_new, *d_new)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        if patient_position:
            ds.PatientPosition = patient_position
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, tag])
        sop_uid = generate_uid(entropy_srcs=[ds.SOPInstanceUID, tag])
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(new).tobytes()
        target = out_dir / Path(path).name
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def restore_as(files: Sequence[Path], out_dir: Path, position: str) -> list[Path]:
    """``restore_series`` with the orientation a scanner uses for ``position`` (HFS, HFP,
    FFS, FFP, HFDL, HFDR, FFDL, FFDR)."""
    row, column = PATIENT_POSITIONS[position]
    return restore_series(
        files, out_dir, row_direction=row, column_direction=column, patient_position=position
    )


def _in_plane(v: np.ndarray, h: np.ndarray, d: np.ndarray) -> tuple[int, int]:
    """``v`` = a*h + b*d with (a, b) one of (+-1, 0), (0, +-1); raises ValueError else."""
    a, b = round(float(v @ h)), round(float(v @ d))
    if sorted((abs(a), abs(b))) != [0, 1] or not np.allclose(v, a * h + b * d, atol=1e-6):
        raise ValueError(f"direction {tuple(v)} is not +- a row or column direction of the images")
    return a, b


def pixel_positions_lps(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """LPS centres (mm, float64 [z, y, x, 3]) of every pixel of single-frame slices, each
    from its own header: ImagePositionPatient + column * column spacing * row cosines +
    row * row spacing * column cosines (PS3.3 C.7.6.2.1.1). Sampling the phantom there
    gives the truth in patient space whatever the orientation, tilt or slice order."""
    planes = []
    for ds in datasets:
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
        planes.append(
            ipp + c[..., None] * column_spacing * iop[:3] + r[..., None] * row_spacing * iop[3:]
        )
    return np.stack(planes)
