"""Synthetic multi-phase CT studies of the phantom, written as scanner-like DICOM files.

Used by tests and the demo: the files go through the real receive / route / infer / send
chain, and ``SynthSeries.truth`` is the answer the segmentation is scored against.

Pixels are stored the way many scanners store CT: unsigned 12-bit values in 16-bit words
with RescaleIntercept -1024 (HU = stored - 1024), so HU below -1024 are clipped.
Slices are stacked towards the head: ``files[k]`` lies at ``origin_lps[2] + k * spacing``
and matches ``truth[k]``. InstanceNumber counts the other way (1 = most superior), as a
head-first helical scan numbers them, so consumers must sort by position, not by number.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from devkit.phantom import Phantom, grid_points, truth_from_tissues
from devkit.synth_dicom import (
    HU_OFFSET,
    SUPPORTED_TRANSFER_SYNTAXES,
    series_template,
    write_slice,
)

SERIES_NUMBERS = {"N": 2, "A": 3, "P": 4, "D": 5}
_DESCRIPTION_SUFFIX = {"N": "NC", "A": "ARTERIAL", "P": "PORTAL VENOUS", "D": "DELAYED 5MIN"}
_UID_NAMESPACE = "dicom_node.synth"  # its old module name: kept so UIDs stay the same
_GEOMETRY_KEYS = {
    "rows",
    "columns",
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "slices",
    "z_offset_mm",
    "xy_offset_mm",
    "gantry_tilt_deg",
}
_MAX_STORED = 4095  # 12 bits stored


@dataclass
class SynthSeries:
    """One generated series and the phantom truth in its own voxel grid."""

    phase: str
    series_uid: str
    series_number: int
    description: str
    files: list[Path]
    truth: np.ndarray  # uint8 [z, y, x], phantom STRUCTURES ids
    origin_lps: tuple[float, float, float]
    spacing_zyx: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    # int16 [z, y, x] HU exactly as the files decode (stored value + RescaleIntercept)
    hu: np.ndarray | None = field(default=None, repr=False)
    gantry_tilt_deg: float = 0.0  # see SeriesGeometry: truth lies on the tilted pixels


@dataclass
class SynthStudy:
    """A generated study: one series per requested phase, all in one frame of reference."""

    study_uid: str
    patient_id: str
    accession: str
    series: list[SynthSeries]
    frame_of_reference_uid: str = ""
    seed: int = 0

    def by_phase(self, phase: str) -> SynthSeries:
        for series in self.series:
            if series.phase == phase:
                return series
        raise KeyError(f"study {self.study_uid} has no {phase!r} series")


@dataclass(frozen=True)
class SeriesGeometry:
    """The voxel grid of one axial series (slices towards the head).

    Untilted (the default): identity direction, ImageOrientationPatient 1\\0\\0\\0\\1\\0.
    With ``gantry_tilt_deg`` the image plane is rotated about the patient's left-right axis
    (column direction 0\\cos\\sin: positive angles move down the image towards the head)
    while the table still moves along z: ImagePositionPatient steps by
    ``slice_thickness_mm`` along z only, so the stack is sheared (the slice normal is
    not the stacking direction), as a tilted helical scan reconstructs it.
    ``origin_lps`` is ImagePositionPatient of slice 0 (its first pixel's centre).
    """

    rows: int
    columns: int
    pixel_spacing_mm: float
    slice_thickness_mm: float  # table increment between slices (along z)
    slices: int
    origin_lps: tuple[float, float, float]
    gantry_tilt_deg: float = 0.0

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.slice_thickness_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.columns)

    @property
    def image_orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient: row (x index) then column (y index) direction, LPS."""
        t = np.deg2rad(self.gantry_tilt_deg)
        return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the LPS steps of the x, y and slice index axes
        (unit vectors; the slice axis is the table's z, not the normal, when tilted)."""
        iop = self.image_orientation
        return np.array([iop[:3], iop[3:], (0.0, 0.0, 1.0)]).T


def _uid(seed: int, patient_id: str, *parts: object) -> str:
    """Deterministic UID: the same seed and patient give the same study, series and SOPs."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), patient_id, *map(str, parts)])


def series_geometry(
    phantom: Phantom,
    *,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing_mm: float = 0.78,
    slice_thickness_mm: float = 2.5,
    slices: int | None = None,
    z_offset_mm: float = 0.0,
    xy_offset_mm: float | tuple[float, float] = 0.0,
    gantry_tilt_deg: float = 0.0,
) -> SeriesGeometry:
    """The grid a scanner would reconstruct for ``phantom``.

    The field of view is centred on the table centre (x 0, y 10 mm) plus ``xy_offset_mm``;
    ``slices=None`` covers the phantom's z extent (kidneys and ureters), otherwise the
    slices are centred on it; ``z_offset_mm`` shifts the stack. ``gantry_tilt_deg`` tilts
    every image plane about its centre's left-right axis (a sheared stack, see
    ``SeriesGeometry``); the slice centres stay where the untilted ones are.
    """
    z0, z1 = phantom.z_extent_mm
    if slices is None:
        slices = int(np.ceil((z1 - z0) / slice_thickness_mm)) + 1
        first_z = z0
    else:
        first_z = 0.5 * (z0 + z1) - 0.5 * (slices - 1) * slice_thickness_mm
    dx, dy = (xy_offset_mm, xy_offset_mm) if np.isscalar(xy_offset_mm) else xy_offset_mm
    if not gantry_tilt_deg:
        origin = (
            round(float(dx) - 0.5 * (columns - 1) * pixel_spacing_mm, 4),
            round(10.0 + float(dy) - 0.5 * (rows - 1) * pixel_spacing_mm, 4),
            round(first_z + z_offset_mm, 1),
        )
        return SeriesGeometry(rows, columns, pixel_spacing_mm, slice_thickness_mm, slices, origin)
    if not -45.0 < gantry_tilt_deg < 45.0:
        raise ValueError(f"gantry tilt {gantry_tilt_deg} degrees is outside (-45, 45)")
    t = np.deg2rad(gantry_tilt_deg)
    half_column_mm = 0.5 * (rows - 1) * pixel_spacing_mm  # centre to first row, in plane
    origin = (
        round(float(dx) - 0.5 * (columns - 1) * pixel_spacing_mm, 4),
        round(10.0 + float(dy) - half_column_mm * float(np.cos(t)), 4),
        round(first_z + z_offset_mm - half_column_mm * float(np.sin(t)), 4),
    )
    return SeriesGeometry(
        rows, columns, pixel_spacing_mm, slice_thickness_mm, slices, origin, float(gantry_tilt_deg)
    )


def grid_tissues(phantom: Phantom, geometry: SeriesGeometry) -> np.ndarray:
    """Tissue ids [z, y, x] of ``phantom`` on ``geometry`` (tilted grids sampled per point)."""
    if not geometry.gantry_tilt_deg:
        return phantom.tissues_on_grid(
            geometry.origin_lps, geometry.spacing_zyx, geometry.shape_zyx
        )
    points = grid_points(
        geometry.origin_lps, geometry.spacing_zyx, geometry.shape_zyx, geometry.direction
    )
    return phantom.tissues(points)


def _phase_rng(seed: int, phase: str) -> np.random.Generator:
    return np.random.default_rng([seed, 0x5E71E5, SERIES_NUMBERS[phase]])


def phantom_volumes(
    seed: int, phases: str, geometry: SeriesGeometry
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """HU volumes (int16 [z, y, x] per phase) and truth, without writing DICOM.

    The HU are exactly what ``generate_study`` stores for the same seed, phase and grid
    (12-bit clipping included), so a test may skip the files when it only needs pixels.
    """
    phantom = Phantom(seed)
    tissues = grid_tissues(phantom, geometry)
    volumes = {
        phase: _stored_to_hu(_hu_to_stored(phantom.hu(tissues, phase, _phase_rng(seed, phase))))
        for phase in phases
    }
    return volumes, truth_from_tissues(tissues)


def _stored_to_hu(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.int16) - np.int16(HU_OFFSET)


def _hu_to_stored(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu) + HU_OFFSET, 0, _MAX_STORED).astype(np.uint16)


def generate_study(
    out_dir: Path,
    *,
    seed: int = 0,
    phases: str = "NAPD",
    rows: int = 512,
    columns: int = 512,
    pixel_spacing_mm: float = 0.78,
    slice_thickness_mm: float = 2.5,
    slices: int | None = None,
    gantry_tilt_deg: float = 0.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "SYNTH^PATIENT",
    patient_id: str | None = None,
    descriptions: Mapping[str, str] | None = None,
    geometry: Mapping[str, Mapping[str, object]] | None = None,
) -> SynthStudy:
    """Write a multi-phase CT study of ``Phantom(seed)`` under ``out_dir``.

    Each phase becomes ``out_dir/<NN>_<phase>/IM<kkkk>.dcm`` (NN = SeriesNumber, kkkk =
    InstanceNumber). ``slices=None`` covers the kidneys and ureters; ``gantry_tilt_deg``
    tilts every series (a sheared stack, see ``SeriesGeometry``; ``truth`` is then on the
    tilted pixels). ``geometry`` overrides, per phase, any of rows, columns,
    pixel_spacing_mm, slice_thickness_mm, slices, z_offset_mm, xy_offset_mm (float or
    (dx, dy)), gantry_tilt_deg; ``descriptions`` overrides SeriesDescription per phase.
    The same seed always gives the same UIDs and pixels.
    """
    phases = phases.upper()
    unknown = set(phases) - set(SERIES_NUMBERS)
    if unknown or len(set(phases)) != len(phases):
        raise ValueError(f"phases {phases!r} must be distinct letters out of N, A, P, D")
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax {transfer_syntax} is not supported; use one of "
            + ", ".join(uid.name for uid in SUPPORTED_TRANSFER_SYNTAXES)
        )
    for phase, overrides in (geometry or {}).items():
        bad = set(overrides) - _GEOMETRY_KEYS
        if bad:
            raise ValueError(f"geometry for phase {phase!r} has unknown keys {sorted(bad)}")

    out_dir = Path(out_dir)
    phantom = Phantom(seed)
    patient_id = patient_id or f"SYN{seed:06d}"
    study = SynthStudy(
        study_uid=_uid(seed, patient_id, "study"),
        patient_id=patient_id,
        accession=f"A{seed:08d}",
        series=[],
        frame_of_reference_uid=_uid(seed, patient_id, "frame-of-reference"),
        seed=seed,
    )
    tissue_cache: dict[SeriesGeometry, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp:
        for phase in phases:
            params: dict[str, object] = {
                "rows": rows,
                "columns": columns,
                "pixel_spacing_mm": pixel_spacing_mm,
                "slice_thickness_mm": slice_thickness_mm,
                "slices": slices,
            }
            if gantry_tilt_deg:
                params["gantry_tilt_deg"] = gantry_tilt_deg
            params.update((geometry or {}).get(phase, {}))
            grid = series_geometry(phantom, **params)  # type: ignore[arg-type]
            if grid not in tissue_cache:
                tissue_cache[grid] = grid_tissues(phantom, grid)
            tissues = tissue_cache[grid]
            study.series.append(
                _write_series(
                    study, phantom, phase, grid, tissues, out_dir, transfer_syntax,
                    patient_name, descriptions, Path(tmp),
                )
            )  # fmt: skip
    return study


def _write_series(
    study: SynthStudy,
    phantom: Phantom,
    phase: str,
    grid: SeriesGeometry,
    tissues: np.ndarray,
    out_dir: Path,
    transfer_syntax: str,
    patient_name: str,
    descriptions: Mapping[str, str] | None,
    workdir: Path,
) -> SynthSeries:
    hu = phantom.hu(tissues, phase, _phase_rng(study.seed, phase))
    stored = _hu_to_stored(hu)
    rng = np.random.default_rng([study.seed, 0x4EAD, SERIES_NUMBERS[phase]])
    series_number = SERIES_NUMBERS[phase]
    description = (descriptions or {}).get(phase) or (
        f"ABD {grid.slice_thickness_mm:g}mm {_DESCRIPTION_SUFFIX[phase]}"
    )
    series_uid = _uid(study.seed, study.patient_id, "series", phase)
    template = series_template(
        study, phase, series_number, series_uid, description, grid, patient_name, rng
    )
    folder = out_dir / f"{series_number:02d}_{phase}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files: list[Path] = []
    for k in range(grid.slices):
        instance_number = grid.slices - k  # 1 = most superior slice
        z_mm = round(grid.origin_lps[2] + k * grid.slice_thickness_mm, 4)
        path = folder / f"IM{instance_number:04d}.dcm"
        sop_uid = _uid(study.seed, study.patient_id, "sop", phase, k)
        write_slice(
            template, stored[k], path, sop_uid, instance_number, z_mm, grid,
            transfer_syntax, workdir,
        )  # fmt: skip
        files.append(path)
    return SynthSeries(
        phase=phase,
        series_uid=series_uid,
        series_number=series_number,
        description=description,
        files=files,
        truth=truth_from_tissues(tissues),
        origin_lps=grid.origin_lps,
        spacing_zyx=grid.spacing_zyx,
        shape_zyx=grid.shape_zyx,
        hu=_stored_to_hu(stored),
        gantry_tilt_deg=grid.gantry_tilt_deg,
    )


def write_truth_nifti(series: SynthSeries, path: Path) -> None:
    """Write ``series.truth`` as NIfTI in the series' physical space.

    NIfTI stores RAS; SimpleITK converts from its LPS origin and direction, so the mask
    overlays the DICOM series in any viewer. A gantry-tilted series is refused: NIfTI's
    qform cannot hold its shear and SimpleITK would write it orthogonalised.
    """
    if series.gantry_tilt_deg:
        raise ValueError(
            f"series {series.series_uid} has a {series.gantry_tilt_deg:g} degree gantry tilt: "
            "its truth cannot be written with an orthogonal NIfTI affine"
        )
    image = sitk.GetImageFromArray(series.truth)
    image.SetOrigin(tuple(float(v) for v in series.origin_lps))
    sz, sy, sx = series.spacing_zyx
    image.SetSpacing((float(sx), float(sy), float(sz)))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
