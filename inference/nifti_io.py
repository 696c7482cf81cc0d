"""NIfTI in and out, in the same physical (LPS) space as the DICOM series.

SimpleITK converts NIfTI's RAS to LPS on read and back on write, so a mask written from
a Volume's geometry overlays the DICOM series and the source NIfTI in any viewer.

A gantry-tilted series is a sheared grid (``inference.orientation.stack_geometry``): its
slices step along the table while each image plane is tilted. NIfTI's qform (a rotation)
cannot hold a shear, and SimpleITK's writer orthogonalises one with only a warning, which
puts the last slice of a 15 degree stack tens of millimetres from its DICOM position. A
sheared mask is therefore written with nibabel, voxel for voxel on the DICOM pixels, its
affine (shear included) in the sform and no qform (qform_code 0), so no reader can fall
back to a rotation that disagrees with it; ``descrip`` names the tilt. Readers that honour
the sform (nibabel, FSL, ``read_nifti`` here) place every voxel where the DICOM puts it.
ITK-based readers (SimpleITK, ITK-SNAP, nnU-Net's SimpleITKIO) cannot hold a shear: without
a qform they refuse the file ("ITK only supports orthonormal direction cosines") instead
of misplacing it. Read it with nibabel, or use the DICOM-SEG, whose frames carry their
own positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.orientation import is_orthogonal, stack_geometry, tilt_deg
from inference.volume import SeriesReadError, Volume

# nibabel and SimpleITK are imported where files are read or written, not here: the node
# process imports this module (the path API checks request paths) and runs without them.
if TYPE_CHECKING:
    import nibabel as nib

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, series_uid: str = "") -> Volume:
    """A NIfTI image as a Volume (array [z, y, x] float32 in HU).

    The geometry is the file's own. A sheared sform (a gantry-tilted stack, sform_code set)
    is read with nibabel and kept as a non-orthogonal ``direction``: SimpleITK refuses such
    a file, or orthogonalises it when a qform is present too. Raises ``SeriesReadError``
    naming the file when it cannot be read as one 3D scalar image.
    """
    import SimpleITK as sitk

    sheared = _sheared_nifti(path)
    if sheared is not None:
        return _read_sheared(path, sheared, series_uid)
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise SeriesReadError(f"{path} cannot be read as NIfTI: {exc}") from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesReadError(f"{path} is not a 3D scalar image")
    return Volume.from_sitk(img, series_uid=series_uid or str(path))


def _sheared_nifti(path: Path) -> nib.Nifti1Image | None:
    """The file opened by nibabel (header only) when NIfTI readers place it by a sheared
    sform (sform_code > 0, axes not orthogonal); None otherwise, or when nibabel cannot
    open it (SimpleITK then reads it, or says why not)."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception:  # noqa: BLE001 - not NIfTI to nibabel: SimpleITK's error is clearer
        return None
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        return None
    sform, code = image.header.get_sform(coded=True)
    if sform is None or not code:
        return None
    axes = np.asarray(sform, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 0) or is_orthogonal((axes / norms).ravel()):
        return None
    return image


def _read_sheared(path: Path, image: nib.Nifti1Image, series_uid: str) -> Volume:
    if len(image.shape) != 3:
        raise SeriesReadError(f"{path} is not a 3D scalar image")
    lps = _LPS_TO_RAS @ np.asarray(image.header.get_sform(), dtype=np.float64)
    spacing_xyz = np.linalg.norm(lps[:3, :3], axis=0)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt voxel data
        raise SeriesReadError(f"{path} cannot be read as NIfTI: {exc}") from exc
    return Volume(
        array=np.ascontiguousarray(np.transpose(data, (2, 1, 0))),
        spacing_zyx=tuple(float(v) for v in spacing_xyz[::-1]),  # type: ignore[arg-type]
        origin_lps=tuple(float(v) for v in lps[:3, 3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in (lps[:3, :3] / spacing_xyz).ravel()),
        series_uid=series_uid or str(path),
    )


def write_volume(volume: Volume, path: Path) -> Path:
    """Write a Volume as NIfTI on its slice headers' grid (used by the naive benchmark and
    tests); a sheared stack as ``write_mask`` writes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(stack_geometry(volume), volume.array, path, compress=False)
    return path


def affine_ras(placed: Volume) -> np.ndarray:
    """The 4x4 NIfTI (RAS) affine, voxel index (i, j, k) = (x, y, z) -> mm, of a Volume's
    geometry as it stands (shear included)."""
    lps = np.eye(4)
    direction = np.asarray(placed.direction, dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(placed.spacing_zyx[::-1], dtype=np.float64)
    lps[:3, 3] = placed.origin_lps
    return _LPS_TO_RAS @ lps


def _save(placed: Volume, array: np.ndarray, path: Path, *, compress: bool) -> None:
    """``array`` [z, y, x] on ``placed``'s grid: SimpleITK for an orthogonal grid, nibabel
    with a sheared sform and no qform otherwise (module docstring)."""
    import nibabel as nib
    import SimpleITK as sitk

    if is_orthogonal(placed.direction):
        sitk.WriteImage(placed.to_sitk(array), str(path), useCompression=compress)
        return
    image = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), None)
    image.header.set_data_dtype(array.dtype)
    image.set_sform(affine_ras(placed), code=1)  # scanner anatomical: DICOM patient space
    image.set_qform(None, code=0)  # a rotation cannot hold the shear: no qform at all
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = f"sheared: gantry tilt {tilt_deg(placed.direction):.2f} deg"
    nib.save(image, str(path))


def write_mask(reference: Volume, label_map: np.ndarray, path: Path) -> Path:
    """A uint8 label map [z, y, x] as NIfTI on ``reference``'s voxels (written atomically).

    Voxel (x, y, z) of the file is pixel (column x, row y) of ``reference.headers[z]``: the
    affine comes from the slice headers, so a gantry-tilted (sheared) series gets a sheared
    sform (module docstring). Raises ``ValueError`` when the label map does not match the
    reference's shape and ``StackGeometryError`` (naming the series) when its slices do not
    form one regular grid.
    """
    if label_map.shape != reference.shape:
        raise ValueError(
            f"label map {label_map.shape} does not match series {reference.series_uid} "
            f"{reference.shape}"
        )
    placed = stack_geometry(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    _save(placed, np.ascontiguousarray(label_map, dtype=np.uint8), tmp, compress=True)
    tmp.replace(path)
    return path
