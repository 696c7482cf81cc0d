"""The outbox against a real Orthanc: retries while it is down, delivery once it is up."""

from __future__ import annotations

import io
from datetime import timedelta

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Dispatch, utcnow
from dicom_node.config import Destination, DispatchSettings
from dicom_node.dispatch import Dispatcher, classify_status
from dicom_node.netutil import free_port
from dicom_node.orthanc import OrthancServer
from tests.dicom_factory import ct_slice, write


def test_status_classes():
    assert classify_status(0x0000).state == "sent"
    assert classify_status(0xB007).state == "sent"
    assert classify_status(0xA700).state == "retry"
    assert classify_status(None).state == "retry"
    assert classify_status(0xC000).state == "failed"
    assert classify_status(0xA900).state == "failed"


def test_pending_send_retries_until_the_pacs_is_up(db, tmp_path):
    port = free_port()
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port)
    dispatcher = Dispatcher(
        db, {"pacs": dest}, DispatchSettings(retry_initial_s=1, timeout_s=5), "DICOM_NODE"
    )
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    path = write(ds, tmp_path / "x.dcm")
    with db.session() as s:
        s.add(
            Dispatch(
                kind="result",
                sop_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                path=str(path),
                destination="pacs",
            )
        )

    assert dispatcher.poll() == 1  # nobody listens on the port
    with db.session() as s:
        row = s.scalars(select(Dispatch)).one()
        assert (row.state, row.attempts) == ("pending", 1)
        assert "refused" in row.last_error or "aborted" in row.last_error
        first_delay = row.next_attempt_at - utcnow()
        assert timedelta(0) < first_delay <= timedelta(seconds=1)
    assert dispatcher.poll() == 0  # not due yet

    with OrthancServer(tmp_path / "orthanc", aet="ORTHANC", dicom_port=port) as orthanc:
        with db.session() as s:
            s.scalars(select(Dispatch)).one().next_attempt_at = utcnow()
        assert dispatcher.poll() == 1
        with db.session() as s:
            row = s.scalars(select(Dispatch)).one()
            assert (row.state, row.attempts, row.last_status) == ("sent", 2, 0)
        instance = orthanc.find_instance(ds.SOPInstanceUID)
        assert instance is not None
        received = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)))
        assert received.PixelData == ds.PixelData


def test_backoff_grows_and_is_capped(db):
    dispatcher = Dispatcher(db, {}, DispatchSettings(retry_initial_s=2, retry_max_s=10), "X")
    delays = [dispatcher.backoff_s(n) for n in (1, 2, 3, 10)]
    assert 1 <= delays[0] <= 2 and 2 <= delays[1] <= 4 and 4 <= delays[2] <= 8
    assert 5 <= delays[3] <= 10
