"""Scanner-like DICOM encoding of synthetic CT slices (headers, timing, transfer syntaxes).

Split from ``synth`` so the anatomy / geometry side and the DICOM side stay small. The
study looks like a four-phase kidney protocol on one scanner: the non-contrast scan at
10:15, the bolus 90 s later, then arterial (+30 s), portal venous (+70 s) and delayed
(+300 s) acquisitions.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

if TYPE_CHECKING:
    from devkit.synth import SeriesGeometry, SynthStudy

SUPPORTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,  # encoded with GDCM (python-gdcm); pydicom has no encoder for it
)
HU_OFFSET = 1024  # stored value = HU + 1024 (RescaleIntercept -1024)
_PROTOCOL = "ABDOMEN_4PHASE_KIDNEY"
# Seconds after the non-contrast scan: the bolus starts, then each phase is acquired.
_BOLUS_START_S = 90.0
_PHASE_DELAY_S = {"N": -_BOLUS_START_S, "A": 30.0, "P": 70.0, "D": 300.0}
_STUDY_START = dt.datetime(2024, 3, 15, 10, 15, 0)


def _ds_time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")


def series_template(
    study: SynthStudy,
    phase: str,
    series_number: int,
    series_uid: str,
    description: str,
    grid: SeriesGeometry,
    patient_name: str,
    rng: np.random.Generator,
) -> Dataset:
    """Attributes shared by every slice of a series."""
    ds = Dataset()
    # Latin-1 like most scanners, UTF-8 when a name or description needs it (Korean).
    texts = (description, patient_name)
    ds.SpecificCharacterSet = "ISO_IR 192" if any(not t.isascii() for t in texts) else "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    study_date = _STUDY_START.strftime("%Y%m%d")
    acquired = _STUDY_START + dt.timedelta(seconds=_BOLUS_START_S + _PHASE_DELAY_S[phase])
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = _ds_time(_STUDY_START)
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _ds_time(acquired)
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = "SYNTHETIC MEDICAL"
    ds.InstitutionName = "DICOM NODE TEST HOSPITAL"
    ds.ReferringPhysicianName = "REFERRER^SYNTH"
    ds.StationName = "CTSYN01"
    ds.StudyDescription = "CT ABDOMEN KIDNEY 4 PHASE"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "PhantomScan 128"
    ds.PatientName = patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = f"{1940 + study.seed % 50:04d}{1 + study.seed % 12:02d}15"
    ds.PatientSex = "F" if study.seed % 2 else "M"
    ds.PatientAge = f"{2024 - (1940 + study.seed % 50):03d}Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = f"{grid.slice_thickness_mm:g}"
    ds.KVP = "120"
    ds.SpacingBetweenSlices = f"{grid.slice_thickness_mm:g}"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "SYN 1.0"
    ds.ProtocolName = _PROTOCOL
    ds.ReconstructionDiameter = f"{grid.columns * grid.pixel_spacing_mm:.1f}"
    ds.GantryDetectorTilt = f"{grid.gantry_tilt_deg:g}"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = int(rng.integers(180, 260))
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "HFS"
    ds.SpiralPitchFactor = 0.8
    if phase != "N":
        ds.ContrastBolusAgent = "IOPROMIDE 370"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "100"
        ds.ContrastBolusStartTime = _ds_time(_STUDY_START + dt.timedelta(seconds=_BOLUS_START_S))
        ds.ContrastFlowRate = "4"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if grid.gantry_tilt_deg:  # the tilted plane (SeriesGeometry)
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in grid.image_orientation]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = "XY"  # the laser landmark, as scanners write it
    ds.ImagesInAcquisition = grid.slices
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.rows
    ds.Columns = grid.columns
    ds.PixelSpacing = [f"{grid.pixel_spacing_mm:g}", f"{grid.pixel_spacing_mm:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(-HU_OFFSET)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _encode_jpeg_lossless_sv1(ds: Dataset, workdir: Path) -> bytes:
    """Encapsulated JPEG Lossless SV1 pixel data for ``ds`` (native), made by GDCM."""
    import gdcm  # python-gdcm; imported here so the rest works without it

    src, dst = workdir / "native.dcm", workdir / "jpeg.dcm"
    ds.save_as(src, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError("GDCM could not read the native slice it was given")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError("GDCM could not encode JPEG Lossless SV1")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError("GDCM could not write the JPEG Lossless SV1 slice")
    return pydicom.dcmread(dst).PixelData


def write_slice(
    template: Dataset,
    stored: np.ndarray,
    path: Path,
    sop_uid: str,
    instance_number: int,
    z_mm: float,
    grid: SeriesGeometry,
    transfer_syntax: str,
    workdir: Path,
) -> None:
    ds = Dataset()
    ds.update(template)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "DICOMNODE_SYN"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = template.ContentDate
    ds.InstanceCreationTime = template.ContentTime
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{grid.origin_lps[0]:.4f}", f"{grid.origin_lps[1]:.4f}", z_mm]
    ds.SliceLocation = z_mm
    ds.PixelData = stored.tobytes()
    if transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif transfer_syntax == JPEGLosslessSV1:
        encapsulated = _encode_jpeg_lossless_sv1(ds, workdir)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulated
        ds["PixelData"].VR = "OB"
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)
