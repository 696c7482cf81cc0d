"""The C-STORE SCP against real clients: DCMTK tools and pynetdicom associations."""

from __future__ import annotations

import errno
import os
import subprocess

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from sqlalchemy import select

from db.models import Instance, Series
from devkit.dcmtk import dcmtk_tool
from dicom_node.assembler import AssociationTracker
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.conftest import node_settings, storescu
from tests.dicom_factory import ct_series, ct_slice, write
from tests.scp_helpers import associate, dataset_bytes, send_raw


@pytest.fixture
def scp(tmp_path, db):
    def _start(**overrides):
        settings = node_settings(tmp_path, **overrides)
        spool = Spool(settings.spool_dir, settings.min_free_bytes)
        server = StorageSCP(settings, db, spool, AssociationTracker())
        server.start()
        started.append(server)
        return server

    started: list[StorageSCP] = []
    yield _start
    for server in started:
        server.stop()


def spooled(scp_server) -> list:
    return [p for p in scp_server.spool.root.rglob("*") if p.is_file()]


def _echoscu() -> str:
    exe = dcmtk_tool("echoscu")
    if exe is None:
        pytest.fail("DCMTK echoscu is not installed (apt-get install dcmtk)")
    return exe


def test_echoscu_gets_an_answer(scp):
    server = scp()
    proc = subprocess.run(
        [_echoscu(), "-aet", "TEST_SCU", "-aec", "DICOM_NODE", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


def test_storescu_series_is_spooled_and_recorded(scp, tmp_path, db):
    server = scp()
    files = ct_series(tmp_path / "in", n=4)
    proc = storescu(files, server.port)
    assert proc.returncode == 0, proc.stderr

    ds = pydicom.dcmread(files[0])
    stored = server.spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pydicom.dcmread(stored).PixelData == ds.PixelData
    with db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == 4
        assert series.calling_ae == "TEST_SCU" and series.source_address == "127.0.0.1"
        assert len(s.scalars(select(Instance)).all()) == 4


def test_unknown_calling_ae_is_rejected(scp, tmp_path):
    server = scp(peers=[{"ae_title": "KNOWN_CT", "host": "127.0.0.1"}])
    assoc = associate(server.port, calling_ae="STRANGER")
    assert assoc.is_rejected
    proc = storescu(ct_series(tmp_path / "in", n=1), server.port, calling_ae="STRANGER")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr or "rejected" in proc.stderr.lower()
    assert spooled(server) == []

    known = associate(server.port, calling_ae="KNOWN_CT")
    assert known.is_established
    known.release()


def test_peer_from_another_address_is_rejected(scp):
    server = scp(peers=[{"ae_title": "*", "host": "10.0.0.0/8"}])
    assoc = associate(server.port)
    assert assoc.is_rejected


def test_truncated_dataset_is_refused_and_leaves_no_file(scp):
    server = scp()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    payload = dataset_bytes(ds)
    assoc = associate(server.port)
    assert assoc.is_established
    status = send_raw(assoc, ds.SOPInstanceUID, payload[: len(payload) - 300])
    assoc.release()
    assert status is not None and status & 0xF000 in (0xA000, 0xC000)
    assert spooled(server) == []


def test_garbage_dataset_is_refused(scp):
    server = scp()
    assoc = associate(server.port)
    status = send_raw(assoc, generate_uid(), b"\x08\x00\x05\x00CS\xff\xff" + os.urandom(64))
    assoc.release()
    assert status is not None and status != 0
    assert spooled(server) == []


@pytest.mark.parametrize("bad_uid", ["1.2.3/../../4", "..", "1.2.abc"])
def test_path_traversal_uid_gets_a_failure_not_a_file(scp, bad_uid):
    server = scp()
    ds = ct_slice(generate_uid(), bad_uid if bad_uid != ".." else "1.2", 0)
    if bad_uid == "..":
        ds.StudyInstanceUID = ".."
    assoc = associate(server.port)
    status = send_raw(assoc, ds.SOPInstanceUID, dataset_bytes(ds))
    assoc.release()
    assert status is not None and status != 0
    assert spooled(server) == []
    assert not any(p.is_file() for p in server.spool.root.parent.rglob("*.dcm"))


def test_below_free_disk_watermark_answers_out_of_resources(scp, tmp_path):
    server = scp(min_free_bytes=2**62)
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    assoc = associate(server.port)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert int(status.Status) == 0xA700
    assert spooled(server) == []


def test_disk_full_while_writing_answers_out_of_resources(scp, monkeypatch):
    server = scp()
    real_write, real_writev = os.write, os.writev

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr(os, "writev", full_disk)  # the spool writes an instance's parts
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    assoc = associate(server.port)
    status = assoc.send_c_store(ds)
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "writev", real_writev)
    assoc.release()
    assert int(status.Status) == 0xA700
    assert spooled(server) == []


def test_resent_instance_is_stored_once(scp, tmp_path, db):
    server = scp()
    files = ct_series(tmp_path / "in", n=2)
    assert storescu(files, server.port).returncode == 0
    assert storescu(files[:1], server.port).returncode == 0

    assert len(spooled(server)) == 2
    with db.session() as s:
        rows = s.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [r.receive_count for r in rows] == [2, 1]
        assert s.scalars(select(Series)).one().instance_count == 2


@pytest.mark.parametrize(
    ("syntax", "flag"), [(RLELossless, "-xr"), (JPEGLSLossless, "-xt"), (JPEG2000Lossless, "-xv")]
)
def test_compressed_instances_are_kept_as_sent_and_decode(scp, tmp_path, syntax, flag):
    from inference.volume import load_series

    server = scp()
    study, series = generate_uid(), generate_uid()
    originals, paths = [], []
    for i in range(3):
        ds = ct_slice(study, series, i)
        originals.append(ds.pixel_array.copy())
        ds.compress(syntax)
        paths.append(write(ds, tmp_path / f"{i}.dcm"))
    proc = storescu(paths, server.port, "DICOM_NODE", "TEST_SCU", flag)
    assert proc.returncode == 0, proc.stderr

    stored = sorted(server.spool.root.glob(f"{study}/{series}/*.dcm"))
    assert len(stored) == 3
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax  # not transcoded on the way in
    volume = load_series(stored)
    for z, original in enumerate(originals):
        assert (volume.array[z] == original).all()
