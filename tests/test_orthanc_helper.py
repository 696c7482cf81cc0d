"""The Orthanc test helper runs a real Orthanc that real DCMTK tools can talk to.

These tests fail (they do not skip) when Orthanc or DCMTK is missing: the integration
tests of the whole project depend on both.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from devkit import net
from devkit.dcmtk import dcmtk_tool
from devkit.orthanc import OrthancError, OrthancServer, orthanc_available
from dicom_node.echo import echo

pytestmark = pytest.mark.timeout(120)


def _dcmtk(tool: str) -> str:
    path = dcmtk_tool(tool)
    assert path, f"DCMTK tool {tool!r} not found: install the Debian package 'dcmtk'"
    return path


def _small_ct(path: Path) -> Dataset:
    """A valid 16x16 CT image with signed pixels, written to ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = "ORTHANC-HELPER"
    ds.PatientName = "Test^Orthanc"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    pixels = np.random.default_rng(7).integers(-1024, 2000, size=(16, 16), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), throwaway=True) as server:
        yield server


def test_orthanc_is_installed() -> None:
    assert orthanc_available(), "Orthanc is missing: install the Debian package 'orthanc'"


def test_echoscu_reaches_orthanc(orthanc: OrthancServer) -> None:
    result = subprocess.run(
        [_dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", orthanc.aet, "127.0.0.1",
         str(orthanc.dicom_port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert orthanc.echo()


def test_wrong_called_ae_is_rejected(orthanc: OrthancServer) -> None:
    assert not echo("127.0.0.1", orthanc.dicom_port, "NOT_ORTHANC")


def test_storescu_instance_is_stored_with_identical_pixels(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    sent = _small_ct(tmp_path / "ct.dcm")
    result = subprocess.run(
        [_dcmtk("storescu"), "-aet", "STORESCU", "-aec", orthanc.aet, "127.0.0.1",
         str(orthanc.dicom_port), str(tmp_path / "ct.dcm")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    instance_id = orthanc.find_instance(sent.SOPInstanceUID)
    assert instance_id is not None
    assert instance_id in orthanc.instances()
    assert orthanc.count_instances() >= 1
    assert orthanc.instance_tags(instance_id)["SOPInstanceUID"] == sent.SOPInstanceUID
    assert orthanc.instances_of_series(sent.SeriesInstanceUID) == [instance_id]

    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(instance_id)))
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData


def test_unknown_peer_is_rejected_when_only_modalities_are_accepted(tmp_path: Path) -> None:
    modalities = {"node": ("KNOWN_SCU", "127.0.0.1", net.free_port())}
    with OrthancServer(tmp_path, modalities=modalities, accept_unknown_peers=False) as server:
        assert not server.echo(calling_ae="STRANGER")
        assert server.echo(calling_ae="KNOWN_SCU")


def test_stop_ends_the_process_and_is_idempotent(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path).start()
    pid, dicom_port, http_port = server.pid, server.dicom_port, server.http_port
    assert pid is not None
    assert (tmp_path / "orthanc.log").stat().st_size > 0
    server.stop()
    server.stop()
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not net.port_is_open("127.0.0.1", dicom_port)
    assert not net.port_is_open("127.0.0.1", http_port)


def test_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path, executable=str(tmp_path / "no-such-orthanc"))
    with pytest.raises(OrthancError, match="no-such-orthanc"):
        server.start()
    assert not server.is_running()


def test_bad_configuration_reports_the_orthanc_log(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path, extra_config={"StorageDirectory": 42})
    with pytest.raises(OrthancError, match="last log lines"):
        server.start(timeout_s=20)
    assert not server.is_running()
