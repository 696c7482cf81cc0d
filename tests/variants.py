"""Real-world variants of synthetic studies, made with pydicom from the generator's files.

Each function writes new files (it never changes its input) and returns their paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def localizer(template: Path, out: Path, *, rows: int = 64, columns: int = 80) -> Path:
    """A coronal localizer (scout) with the template's study and SERIES UID: a scanner that
    files its scout into the axial series."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-200.0, 0.0, 200.0]
    ds.PixelSpacing = [5.0, 5.0]
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = np.full((rows, columns), 1024, np.uint16).tobytes()
    ds.InstanceNumber = 0
    ds.SliceThickness = 1
    return _save(ds, out)


def coronal_reformat(files: Sequence[Path], out_dir: Path, description: str) -> list[Path]:
    """A coronal MPR of an axial series (DERIVED\\SECONDARY\\MPR, its own series UID): one
    coronal image per axial row, so it has more images than the axial series has slices."""
    headers = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    volume = np.stack([d.pixel_array for d in headers])  # [z, y, x], stored values
    first = headers[0]
    dz = float(headers[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    dy, dx = (float(v) for v in first.PixelSpacing)
    x0, y0, z_top = (float(v) for v in headers[-1].ImagePositionPatient)
    series_uid = generate_uid()
    out = []
    for y in range(volume.shape[1]):
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 40
        ds.SeriesDescription = description
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x0, y0 + y * dy, z_top]
        ds.PixelSpacing = [dz, dx]
        plane = volume[::-1, y, :]  # rows from head to feet
        ds.Rows, ds.Columns = plane.shape
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds.InstanceNumber = y + 1
        out.append(_save(ds, out_dir / f"MPR{y:04d}.dcm"))
    return out


def rewrite(
    files: Sequence[Path],
    out_dir: Path,
    change: Callable[[int, pydicom.Dataset], None],
) -> list[Path]:
    """Copies of ``files`` with ``change(index, dataset)`` applied to each."""
    out = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        change(index, ds)
        out.append(_save(ds, out_dir / Path(path).name))
    return out
