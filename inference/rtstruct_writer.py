"""RT Structure Set writer: a label map in the source series' geometry -> one RTSTRUCT instance.

DICOM-SEG (``seg_writer``) is the faithful encoding of a label map, but many treatment
planning systems and older viewers only show RT Structure Sets. This writer outlines the
same label map as planar contours for them, with the same interface: the caller hands over
the source CT datasets sorted so that ``label_map[z]`` lies on ``source_images[z]``, and
headers are enough (``dcmread(..., stop_before_pixels=True)``): every attribute written
comes from the headers, the source pixels are never decoded.

Each label value present in the map becomes one ROI, with ROINumber = ObservationNumber =
the label value, so a structure keeps its number from series to series even when other
labels are missing. Labels absent from the map are skipped (one log line each); a map with
no label at all raises ``EmptySegmentationError``, or with ``allow_empty`` becomes a "no
finding" structure set: every label as an ROI without contours (ContourSequence omitted,
which the ROI Contour module allows). Each ROI carries the label's name and colour (or a
fixed colour per label value), AUTOMATIC generation by "<algorithm> <version>", the label's
type code (with laterality as modifier) in RTROIIdentificationCodeSequence, and
RTROIInterpretedType ORGAN for anatomical structures, CONTROL for anything else (a lesion
found by a model is no physician's GTV).

Contours: for every slice and label, the label's bounding box on that slice is cut out,
padded with one background pixel and traced with ``skimage.measure.find_contours`` at level
0.5. The outline runs through the midpoints between inside and outside pixel centres, so
filling it again (pixel centres inside the polygon) gives back the mask; foreground is
4-connected (pixels touching only at a corner get separate contours). Collinear points are
dropped, which changes no outline. Holes: the outer boundary and each hole boundary are all
written as CLOSED_PLANAR contours on the same image. Readers that combine the contours of
one ROI on one slice by the even-odd (XOR) rule, the usual reading of nested contours, show
the hole; a reader that fills every contour on its own shows it filled. The explicit
CLOSEDPLANAR_XOR type says so unambiguously but is recent and unknown to older systems, the
very ones this writer is for, so it is not used.

Pixel (row, column) maps to patient coordinates per slice as ImagePositionPatient +
column * PixelSpacing[1] * IOP[0:3] + row * PixelSpacing[0] * IOP[3:6]; ContourData is
rounded to 0.01 mm. Every contour references the image it lies on, and the Structure Set
module lists every source image. Patient and study attributes are copied from a decoded
copy of the first source image (``inference.charsets.prepare_source``); the object is
written in the source's Specific Character Set when that carries all its text (the older
systems this writer is for may not read UTF-8), else in ISO_IR 192 (UTF-8), reported to
``on_transcode``; text that cannot be decoded from the source is refused
(``CharacterSetError``). The current standard also wants the Frame of Reference module.

UIDs are deterministic: the caller passes the Series/SOP Instance UIDs (see
``kernel.uids.derived_uid``) and the writer invents none; ROIs and contours come in a
fixed order, so a re-run differs only in the creation date/time attributes.

Cost for 512x512x300 with 10 organ-sized labels (2 cores shared with a training run): ~2.3 s,
1,300 contours with 120,000 points, a 2.8 MB file; most of it is pydicom turning coordinate
strings into DS values, tracing takes a few hundred ms. Memory beyond the map is small: one
slice's bounding boxes at a time and the contours themselves.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from scipy import ndimage
from skimage import measure

from inference.charsets import OutputCharacterSet, prepare_source, settle_output
from inference.labels import ANATOMICAL_STRUCTURE, Code, SegmentLabel
from inference.results import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    RTSTRUCT_SOP_CLASS_UID,
    Algorithm,
    product_version,
)
from inference.seg_writer import (
    EmptySegmentationError,
    check_label_map,
    check_labels,
    present_labels,
    save_atomically,
    source_series_uid,
)

logger = logging.getLogger(__name__)


# RTReferencedStudySequence > ReferencedSOPClassUID: the (retired) Detached Study Management
# SOP Class, which PS3.3 C.8.8.5 still prescribes there.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# Colours for labels without ``color_rgb``, picked by label value: distinct and stable.
_FALLBACK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)

# Copied from the first source image when present; type 2 ones are written empty otherwise.
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# The rest of the Patient, Clinical Trial Subject, General Study, Patient Study and
# Clinical Trial Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3), copied
# when the source has them, as highdicom does for a SEG: the structure set carries the
# same patient and study text as its images.
_PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "ReferencedPatientSequence",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "EthnicGroup",
    "EthnicGroupCodeSequence",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "AdditionalPatientHistory",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)


@dataclass(frozen=True)
class _SliceGeometry:
    """Where a slice lies: patient coordinates = origin + row * row_step + col * col_step."""

    sop_class_uid: str
    sop_instance_uid: str
    origin: np.ndarray
    row_step: np.ndarray  # patient-space move per row index (down the image)
    col_step: np.ndarray  # patient-space move per column index (across the image)

    def to_patient(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.origin + rows[:, None] * self.row_step + cols[:, None] * self.col_step


def build_rtstruct(
    source_images: Sequence[pydicom.Dataset],
    label_map: np.ndarray,
    labels: Sequence[SegmentLabel],
    *,
    algorithm: Algorithm,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME,
    software_versions: str | None = None,
    allow_empty: bool = False,
    on_transcode: Callable[[OutputCharacterSet], None] | None = None,
) -> Dataset:
    """Build an RT Structure Set outlining ``label_map`` (uint8 [z, y, x]) on ``source_images``.

    Parameters
    ----------
    source_images
        The source series' single-frame datasets (headers suffice), sorted so that
        ``label_map[z]`` corresponds to ``source_images[z]``; one study, series and frame of
        reference.
    label_map
        Label ids per voxel, 0 = background; every non-zero value must have a label.
    labels
        Descriptions of the label ids; labels absent from the map are skipped.
    software_versions
        Defaults to this package's version.
    allow_empty
        When the map holds no label: False raises ``EmptySegmentationError``; True writes
        every label as an ROI without contours (analysed, nothing found).
    on_transcode
        Called when the source's character set cannot carry the object's text and it is
        written as ISO_IR 192 instead (the caller records that where an operator sees it).

    Raises
    ------
    EmptySegmentationError
        When the map holds no label value and ``allow_empty`` is False.
    CharacterSetError
        When patient or study text the object would carry cannot be decoded from the
        source.
    ValueError
        When the inputs do not fit together (shape, undescribed values, duplicate labels,
        mixed series, missing geometry).
    """
    started = time.perf_counter()
    series_uid = source_series_uid(source_images)
    label_map = check_label_map(label_map, source_images, series_uid)
    by_value = check_labels(labels)
    frame_of_reference_uid = _common_uid(source_images, "FrameOfReferenceUID", series_uid)
    _common_uid(source_images, "StudyInstanceUID", series_uid)
    _common_uid(source_images, "SeriesInstanceUID", series_uid)
    geometries = [_slice_geometry(ds, z, series_uid) for z, ds in enumerate(source_images)]

    boxes = [ndimage.find_objects(plane) for plane in label_map]
    found = {value for planes in boxes for value, box in enumerate(planes, 1) if box}
    present = present_labels(found, by_value, series_uid, "ROI")
    if not present:
        if not allow_empty:
            raise EmptySegmentationError(
                f"label map for series {series_uid} is empty (no label in {sorted(by_value)}); "
                "no RT Structure Set is written"
            )
        present = [by_value[v] for v in sorted(by_value)]

    source = prepare_source(source_images)
    now = datetime.now()
    ds = Dataset()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_instance_uid
    _copy_patient_and_study(ds, source.images[0])
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    ds.SoftwareVersions = software_versions or product_version()
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = _plain_value(
        source.images[0].get("PositionReferenceIndicator", "")
    )
    ds.InstanceNumber = 1
    ds.StructureSetLabel = (series_description or algorithm.name)[:16]
    ds.StructureSetName = series_description[:64]
    ds.StructureSetDescription = f"{algorithm.name} {algorithm.version}"
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = [
        _referenced_frame_of_reference(source_images, frame_of_reference_uid)
    ]
    ds.StructureSetROISequence = [
        _structure_set_roi(label, algorithm, frame_of_reference_uid) for label in present
    ]
    ds.ROIContourSequence = [_roi_contour(label, label_map, boxes, geometries) for label in present]
    ds.RTROIObservationsSequence = [_roi_observation(label) for label in present]
    charset = settle_output(ds, source, "RT Structure Set")
    if charset.transcoded and on_transcode is not None:
        on_transcode(charset)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    contours = sum(len(item.get("ContourSequence", [])) for item in ds.ROIContourSequence)
    logger.info(
        "rtstruct: built for series %s: %d ROIs, %d contours, %.2f s",
        series_uid,
        len(present),
        contours,
        time.perf_counter() - started,
    )
    return ds


def write_rtstruct(
    source_images: Sequence[pydicom.Dataset],
    label_map: np.ndarray,
    labels: Sequence[SegmentLabel],
    *,
    path: Path,
    **options: Any,
) -> Path:
    """Build the RT Structure Set (``build_rtstruct``, which takes ``options``) and save it as a
    Part 10 file at ``path``, atomically (see ``save_atomically``)."""
    return save_atomically(build_rtstruct(source_images, label_map, labels, **options), path)


def _common_uid(source_images: Sequence[pydicom.Dataset], keyword: str, series_uid: str) -> str:
    """The one value of ``keyword`` all source images share; ValueError if not exactly one."""
    values = {str(ds.get(keyword, "")) for ds in source_images}
    if len(values) != 1 or "" in values:
        raise ValueError(
            f"source images of series {series_uid} must share one {keyword}, got {sorted(values)}"
        )
    return values.pop()


def _slice_geometry(ds: pydicom.Dataset, z: int, series_uid: str) -> _SliceGeometry:
    try:
        origin = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"source image {z} of series {series_uid} lacks a usable ImagePositionPatient, "
            "ImageOrientationPatient or PixelSpacing"
        ) from exc
    if origin.shape != (3,) or orientation.shape != (6,):
        raise ValueError(f"source image {z} of series {series_uid} has malformed geometry")
    return _SliceGeometry(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        origin=origin,
        row_step=orientation[3:] * row_spacing,
        col_step=orientation[:3] * col_spacing,
    )


def _copy_patient_and_study(ds: Dataset, source: pydicom.Dataset) -> None:
    """Patient, General Study and Patient Study attributes of the decoded ``source``."""
    ds.StudyInstanceUID = source.StudyInstanceUID
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, _plain_value(source.get(keyword, "")))
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            value = source[keyword].value
            plain = copy.deepcopy(value) if source[keyword].VR == "SQ" else _plain_value(value)
            setattr(ds, keyword, plain)


def _plain_value(value: object) -> object:
    """A copy of ``value`` that carries no encoding of the source's character set."""
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, MultiValue):
        return [_plain_value(v) for v in value]
    return "" if value is None else value


def _referenced_frame_of_reference(
    source_images: Sequence[pydicom.Dataset], frame_of_reference_uid: str
) -> Dataset:
    first = source_images[0]
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [
        _image_reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in source_images
    ]
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _image_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _structure_set_roi(
    label: SegmentLabel, algorithm: Algorithm, frame_of_reference_uid: str
) -> Dataset:
    item = Dataset()
    item.ROINumber = label.value
    item.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    item.ROIName = label.name[:64]
    item.ROIGenerationAlgorithm = "AUTOMATIC"
    item.ROIGenerationDescription = f"{algorithm.name} {algorithm.version}"[:64]
    return item


def _roi_contour(
    label: SegmentLabel,
    label_map: np.ndarray,
    boxes: list[list[tuple[slice, slice] | None]],
    geometries: list[_SliceGeometry],
) -> Dataset:
    item = Dataset()
    item.ROIDisplayColor = list(label.color_rgb or _fallback_colour(label.value))
    contours = DicomSequence()
    for z, planes in enumerate(boxes):
        box = planes[label.value - 1] if label.value <= len(planes) else None
        if box is None:
            continue
        for points in _slice_contours(label_map[z], box, label.value):
            contours.append(_contour(points, geometries[z], len(contours) + 1))
    if contours:
        item.ContourSequence = contours
    item.ReferencedROINumber = label.value
    return item


def _fallback_colour(value: int) -> tuple[int, int, int]:
    return _FALLBACK_COLOURS[(value - 1) % len(_FALLBACK_COLOURS)]


def _slice_contours(
    plane: np.ndarray, box: tuple[slice, slice], value: int
) -> Iterator[np.ndarray]:
    """Closed outlines of ``plane == value`` as (row, column) arrays in ``plane``'s indices.

    Only the label's bounding box is traced; the one-pixel zero border closes contours
    that would otherwise end at the box's edge. The repeated closing point is dropped.
    """
    rows, cols = box
    mask = np.pad(plane[box] == value, 1).astype(np.float32)
    offset = np.array([rows.start - 1, cols.start - 1], dtype=np.float64)
    for contour in measure.find_contours(mask, 0.5):
        points = _drop_collinear(contour[:-1])
        if len(points) >= 3:
            yield points + offset


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """The corners of a closed polygon: points on a straight run between neighbours go."""
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(cross) > 1e-9]


def _contour(points: np.ndarray, geometry: _SliceGeometry, number: int) -> Dataset:
    xyz = geometry.to_patient(points[:, 0], points[:, 1])
    item = Dataset()
    item.ContourNumber = number
    item.ContourImageSequence = [
        _image_reference(geometry.sop_class_uid, geometry.sop_instance_uid)
    ]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    item.ContourData = _ds_strings(xyz)
    return item


def _ds_strings(values: np.ndarray) -> list[str]:
    """Values rounded to 0.01 mm as DS strings ('-0.00' written as '0.00')."""
    rounded = np.round(values.ravel(), 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    texts = [f"{v:.2f}" for v in rounded.tolist()]
    if any(len(text) > 16 for text in texts):
        raise ValueError("contour coordinates beyond +-1e13 mm do not fit a DS value")
    return texts


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _roi_observation(label: SegmentLabel) -> Dataset:
    code = _code_item(label.type)
    item = Dataset()
    item.ObservationNumber = label.value
    item.ReferencedROINumber = label.value
    if label.laterality is not None:
        code.SegmentedPropertyTypeModifierCodeSequence = [_code_item(label.laterality)]
    item.RTROIIdentificationCodeSequence = [code]
    item.RTROIInterpretedType = "ORGAN" if label.category == ANATOMICAL_STRUCTURE else "CONTROL"
    item.ROIInterpreter = ""
    return item
