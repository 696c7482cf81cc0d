"""Small, real CT datasets built in the tests (no hand-made mocks of pydicom)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    *,
    rows: int = 32,
    sop_uid: str | None = None,
    description: str = "ABD PORTAL VENOUS",
    seed: int = 0,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.PatientName = "TEST^SECRET"
    ds.PatientID = "PID123"
    ds.StudyDate = "20261123"
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-100.0, -100.0, 2.5 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 2.5
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed + index)
    ds.PixelData = rng.integers(-1000, 1000, (rows, rows), dtype=np.int16).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_series(folder: Path, n: int = 5, rows: int = 32, **kw: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        write(ct_slice(study_uid, series_uid, i, rows=rows, **kw), folder / f"{i:03d}.dcm")
        for i in range(n)
    ]
