"""The outbox against a real Orthanc: retries while it is down, delivery once it is up;
against pynetdicom SCPs: refusals, and compressed objects for an Implicit-VR-only PACS."""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from sqlalchemy import select

from db.models import Dispatch, Event, utcnow
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from dicom_node.dispatch import Dispatcher, classify_status
from dicom_node.health import health_of
from kernel.outbox import resend
from kernel.settings import Destination, DispatchSettings
from tests.conftest import wait_until
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
    _queue(db, [ds], tmp_path)

    assert dispatcher.poll() == 1  # nobody listens on the port
    with db.session() as s:
        row = s.scalars(select(Dispatch)).one()
        assert (row.state, row.attempts) == ("pending", 1)
        assert "refused" in row.last_error or "aborted" in row.last_error
        first_delay = row.next_attempt_at - utcnow()
        assert timedelta(0) < first_delay <= timedelta(seconds=1)
    assert dispatcher.poll() == 0  # not due yet

    with OrthancServer(
        tmp_path / "orthanc", aet="ORTHANC", dicom_port=port, throwaway=True
    ) as orthanc:
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


def _queue(db, datasets, tmp_path, destination="pacs") -> None:
    with db.session() as s:
        for i, ds in enumerate(datasets):
            path = write(ds, tmp_path / f"out{i:03d}.dcm")
            s.add(
                Dispatch(
                    kind="result",
                    sop_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    path=str(path),
                    destination=destination,
                )
            )


def test_orthanc_stopped_then_started_gets_every_instance_exactly_once(db, tmp_path):
    """PACS down while results wait: retries with growing delays, then one delivery each."""
    study, series = generate_uid(), generate_uid()
    first = [ct_slice(study, series, i) for i in range(5)]
    later = [ct_slice(study, series, i) for i in range(5, 25)]
    orthanc = OrthancServer(
        tmp_path / "orthanc", aet="ORTHANC", dicom_port=free_port(), http_port=free_port()
    )
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    settings = DispatchSettings(retry_initial_s=0.3, retry_max_s=1.2, timeout_s=5)
    dispatcher = Dispatcher(db, {"pacs": dest}, settings, "DICOM_NODE")
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run_forever, args=(stop, 0.05), daemon=True)
    try:
        orthanc.start()
        _queue(db, first, tmp_path)
        loop.start()
        wait_until(lambda: orthanc.count_instances() == 5, 30, "first results in Orthanc")
        orthanc.stop()

        _queue(db, later, tmp_path)
        retry_times: list = []

        def retried_three_times() -> bool:
            with db.session() as s:
                row = s.scalars(
                    select(Dispatch).where(Dispatch.sop_uid == later[0].SOPInstanceUID)
                ).one()
                if row.attempts > len(retry_times):
                    retry_times.append((row.attempts, utcnow(), row.next_attempt_at))
                return row.attempts >= 3

        wait_until(retried_three_times, 30, "three failed attempts while Orthanc is down")
        with db.session() as s:
            rows = s.scalars(select(Dispatch).where(Dispatch.state != "sent")).all()
            assert len(rows) == len(later)
            assert all(r.state in ("pending", "sending") for r in rows)
            assert any("refused" in (r.last_error or "") for r in rows)
        # The delay before the next attempt grows (1x, 2x, 4x the first, with jitter 0.5-1).
        delays = [(due - seen).total_seconds() for _, seen, due in retry_times[:3]]
        assert delays[-1] > delays[0], delays

        orthanc.start()
        wait_until(
            lambda: _states(db) == {"sent": 25}, 60, "every row sent after Orthanc came back"
        )
        stop.set()
        loop.join(10)
        assert orthanc.count_instances() == 25
        stored = {orthanc.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                  for i in orthanc.instances()}  # fmt: skip
        assert stored == {ds.SOPInstanceUID for ds in first + later}
        with db.session() as s:
            sent_events = s.scalars(select(Event).where(Event.kind == "sent")).all()
            assert len(sent_events) == 25  # one delivery recorded per instance, none twice
    finally:
        stop.set()
        orthanc.stop(graceful=False)  # its storage is thrown away


def _states(db) -> dict[str, int]:
    with db.session() as s:
        counts: dict[str, int] = {}
        for row in s.scalars(select(Dispatch)):
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts


class _CTOnlyPACS:
    """A real storage SCP that accepts only CT Image Storage, and refuses one SOP Instance
    with 0xC211 (an error a resend will not change)."""

    def __init__(self, refuse_sop_uid: str) -> None:
        self.refuse = refuse_sop_uid
        self.received: list[str] = []
        self.ae = AE(ae_title="CTONLY")
        self.ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append(uid)
        return 0xC211 if uid == self.refuse else 0x0000

    def close(self) -> None:
        self.server.shutdown()


def test_destination_that_rejects_fails_quickly_without_a_retry_loop(db, tmp_path):
    study, series = generate_uid(), generate_uid()
    good, refused = ct_slice(study, series, 0), ct_slice(study, series, 1)
    other_class = ct_slice(study, series, 2)
    other_class.SOPClassUID = other_class.file_meta.MediaStorageSOPClassUID = (
        SecondaryCaptureImageStorage
    )
    pacs = _CTOnlyPACS(refuse_sop_uid=refused.SOPInstanceUID)
    try:
        dest = Destination(name="pacs", ae_title="CTONLY", host="127.0.0.1", port=pacs.port)
        dispatcher = Dispatcher(
            db, {"pacs": dest}, DispatchSettings(retry_initial_s=0.01, timeout_s=5), "NODE"
        )
        _queue(db, [good, refused, other_class], tmp_path)
        started = time.monotonic()
        assert dispatcher.poll() == 3
        assert time.monotonic() - started < 10
        assert dispatcher.poll() == 0  # nothing is due again: no loop
        time.sleep(0.1)
        assert dispatcher.poll() == 0
        with db.session() as s:
            rows = {r.sop_uid: r for r in s.scalars(select(Dispatch))}
            assert rows[good.SOPInstanceUID].state == "sent"
            bad = rows[refused.SOPInstanceUID]
            assert (bad.state, bad.attempts, bad.last_status) == ("failed", 1, 0xC211)
            unsupported = rows[other_class.SOPInstanceUID]
            assert (unsupported.state, unsupported.attempts) == ("failed", 1)
            assert "not accepted" in unsupported.last_error
        # Only what the SCP supports went over the wire, each once.
        assert sorted(pacs.received) == sorted([good.SOPInstanceUID, refused.SOPInstanceUID])
    finally:
        pacs.close()


def test_row_older_than_max_age_is_failed_not_retried(db, tmp_path):
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    _queue(db, [ds], tmp_path)
    with db.session() as s:
        s.scalars(select(Dispatch)).one().queued_at = utcnow() - timedelta(hours=2)
    dest = Destination(name="pacs", ae_title="DOWN", host="127.0.0.1", port=free_port())
    settings = DispatchSettings(retry_initial_s=0.01, max_age_s=3600, timeout_s=5)
    dispatcher = Dispatcher(db, {"pacs": dest}, settings, "NODE")
    assert dispatcher.poll() == 1
    assert dispatcher.poll() == 0
    with db.session() as s:
        row = s.scalars(select(Dispatch)).one()
        assert row.state == "failed"
        assert "max_age_s=3600" in row.last_error
        failed = s.scalars(select(Event).where(Event.kind == "send_failed")).one()
        assert ds.SOPInstanceUID in failed.message

    # A resend queues it again with a fresh age: the next failure is a retry, not a failure.
    assert resend(db, [row.id]) == 1
    assert dispatcher.poll() == 1
    with db.session() as s:
        assert s.scalars(select(Dispatch)).one().state == "pending"


def test_storage_commitment_turns_sent_into_committed(tmp_path, start_node):
    """Orthanc commits what it received and reports back on a new association."""
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc",
        aet="ORTHANC",
        modalities={"node": ("DICOM_NODE", "127.0.0.1", node_port)},
        throwaway=True,
    )
    with orthanc:
        node = start_node(
            port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                 "port": orthanc.dicom_port, "storage_commitment": True},
            ],  # fmt: skip
        )
        study, series = generate_uid(), generate_uid()
        datasets = [ct_slice(study, series, i) for i in range(3)]
        _queue(node.db, datasets, tmp_path)
        node.dispatcher.wake.set()

        def all_committed() -> bool:
            return _states(node.db) == {"committed": 3}

        wait_until(all_committed, 60, "Orthanc's storage commitment report")
        assert orthanc.count_instances() == 3
        with node.db.session() as s:
            rows = s.scalars(select(Dispatch)).all()
            assert len({r.commit_uid for r in rows}) == 1 and rows[0].commit_uid
            assert all(r.committed_at >= r.sent_at for r in rows)
            events = s.scalars(select(Event).where(Event.kind == "committed")).all()
            assert {e.message.split()[1] for e in events} == {d.SOPInstanceUID for d in datasets}


def test_commitment_report_with_failures_sends_those_again(db, tmp_path):
    from pydicom.dataset import Dataset

    from dicom_node.commitment import record_report

    study, series = generate_uid(), generate_uid()
    kept, lost = ct_slice(study, series, 0), ct_slice(study, series, 1)
    _queue(db, [kept, lost], tmp_path)
    with db.session() as s:
        for row in s.scalars(select(Dispatch)):
            row.state, row.sent_at, row.commit_uid = "sent", utcnow(), "1.2.3.4"
    report = Dataset()
    report.TransactionUID = "1.2.3.4"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID, ok.ReferencedSOPInstanceUID = CTImageStorage, kept.SOPInstanceUID
    bad.ReferencedSOPClassUID, bad.ReferencedSOPInstanceUID = CTImageStorage, lost.SOPInstanceUID
    bad.FailureReason = 0x0110
    report.ReferencedSOPSequence, report.FailedSOPSequence = [ok], [bad]
    assert record_report(db, 2, report) == 2
    with db.session() as s:
        rows = {r.sop_uid: r for r in s.scalars(select(Dispatch))}
        assert rows[kept.SOPInstanceUID].state == "committed"
        again = rows[lost.SOPInstanceUID]
        assert (again.state, again.commit_uid) == ("pending", None)
        assert "0x0110" in again.last_error
    # A report for a transaction nobody asked for changes nothing.
    report.TransactionUID = "9.9.9"
    assert record_report(db, 1, report) == 0


class _ImplicitOnlyPACS:
    """A real storage SCP that takes CT Image Storage only in Implicit VR Little Endian
    (the one transfer syntax every SCP must accept, PS3.5 10.1) and keeps each data set
    it receives, decoded, with the transfer syntax it came in."""

    def __init__(self) -> None:
        self.received: dict[str, tuple[str, pydicom.Dataset]] = {}
        self.ae = AE(ae_title="IMPLONLY")
        self.ae.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta  # the transfer syntax it came in, to decode pixels
        self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("stored_syntax", [JPEG2000Lossless, RLELossless], ids=["j2k", "rle"])
def test_compressed_images_reach_a_pacs_that_takes_only_implicit_vr(db, tmp_path, stored_syntax):
    """Stored compressed, refused in that syntax: decompressed and sent as Implicit VR
    Little Endian, pixels and SOP Instance UID unchanged, one attempt each."""
    study, series = generate_uid(), generate_uid()
    originals = [ct_slice(study, series, i) for i in range(3)]
    pixels = {ds.SOPInstanceUID: ds.pixel_array.copy() for ds in originals}
    for ds in originals:
        ds.compress(stored_syntax, generate_instance_uid=False)
    pacs = _ImplicitOnlyPACS()
    try:
        dest = Destination(name="pacs", ae_title="IMPLONLY", host="127.0.0.1", port=pacs.port)
        dispatcher = Dispatcher(
            db, {"pacs": dest}, DispatchSettings(retry_initial_s=0.01, timeout_s=5), "NODE"
        )
        _queue(db, originals, tmp_path)
        assert dispatcher.poll() == 3
        with db.session() as s:
            rows = list(s.scalars(select(Dispatch)))
            assert [(r.state, r.attempts, r.last_status, r.last_cause) for r in rows] == [
                ("sent", 1, 0, "destination")
            ] * 3
        assert set(pacs.received) == set(pixels)
        for sop_uid, (syntax, received) in pacs.received.items():
            assert syntax == ImplicitVRLittleEndian
            assert np.array_equal(received.pixel_array, pixels[sop_uid])
    finally:
        pacs.close()


def test_a_conversion_the_node_cannot_make_fails_at_once_as_its_own_error(db, tmp_path):
    """A JPEG 2000 file whose codestream is broken, for a PACS that takes only Implicit VR:
    failed at once, saying it could not be converted, no retry loop, and the destination
    (which answered) is not reported unreachable."""
    study, series = generate_uid(), generate_uid()
    good, broken = ct_slice(study, series, 0), ct_slice(study, series, 1)
    for ds in (good, broken):
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    pacs = _ImplicitOnlyPACS()
    try:
        dest = Destination(name="pacs", ae_title="IMPLONLY", host="127.0.0.1", port=pacs.port)
        dispatcher = Dispatcher(
            db, {"pacs": dest}, DispatchSettings(retry_initial_s=0.01, timeout_s=5), "NODE"
        )
        _queue(db, [good, broken], tmp_path)
        assert dispatcher.poll() == 2
        time.sleep(0.05)
        assert dispatcher.poll() == 0  # nothing is due again: no retry loop
        with db.session() as s:
            rows = {r.sop_uid: r for r in s.scalars(select(Dispatch))}
            assert rows[good.SOPInstanceUID].state == "sent"
            bad = rows[broken.SOPInstanceUID]
            assert (bad.state, bad.attempts, bad.last_status, bad.last_cause) == (
                "failed", 1, None, "node"
            )  # fmt: skip
            assert bad.last_error.startswith("could not convert for the destination: ")
            assert "JPEG 2000" in bad.last_error and broken.SOPInstanceUID in bad.last_error
            health = health_of(s, dest, pending_alert_s=3600)
            assert health.state == "ok", health.reason
        assert set(pacs.received) == {good.SOPInstanceUID}
    finally:
        pacs.close()
