"""NIfTI in and out, in the same physical (LPS) space as the DICOM series.

SimpleITK converts NIfTI's RAS to LPS on read and back on write, so a mask written from
a Volume's geometry overlays the DICOM series and the source NIfTI in any viewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.volume import SeriesReadError, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, series_uid: str = "") -> Volume:
    """A NIfTI image as a Volume (array [z, y, x] float32 in HU)."""
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise SeriesReadError(f"{path} cannot be read as NIfTI: {exc}") from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesReadError(f"{path} is not a 3D scalar image")
    return Volume.from_sitk(img, series_uid=series_uid or str(path))


def write_volume(volume: Volume, path: Path) -> Path:
    """Write a Volume as NIfTI (used for the naive benchmark and tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=False)
    return path


def write_mask(reference: Volume, label_map: np.ndarray, path: Path) -> Path:
    """A uint8 label map as NIfTI in ``reference``'s geometry (written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    sitk.WriteImage(reference.to_sitk(label_map.astype(np.uint8)), str(tmp), useCompression=True)
    tmp.replace(path)
    return path
