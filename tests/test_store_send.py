"""dicom_node.store_send: C-STORE of stored files written by the sender's own thread.

Against DCMTK storescp (the data set's bytes as they arrived, PDUs of 4 KiB), pynetdicom
SCPs (PDU limits at the fragment boundary and none at all, message IDs, answers with an
Error Comment, silence, an abort) and, through the dispatcher, the row's recorded reason.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select

from db.models import Dispatch
from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port
from dicom_node.dispatch import Dispatcher
from dicom_node.store_send import (
    FileStore,
    NotStorable,
    StoreResponse,
    data_set_offset,
    encode_store_request,
)
from kernel.settings import Destination, DispatchSettings
from tests.conftest import wait_until
from tests.dicom_factory import ct_slice, write


def _file(tmp_path: Path, index: int = 0, rows: int = 128) -> tuple[Dataset, Path]:
    ds = ct_slice(generate_uid(), generate_uid(), index, rows=rows)
    return ds, write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")


def _data_set_bytes(path: Path) -> bytes:
    return path.read_bytes()[data_set_offset(path) :]


class _Scp:
    """A pynetdicom C-STORE SCP on 127.0.0.1 that keeps what it got; ``answer(event)``
    returns the status data set (default: success)."""

    def __init__(self, max_pdu: int = 16384, answer=None) -> None:
        self.received: list[tuple[int, str, bytes]] = []  # message ID, SOP UID, data set
        self.aborted = threading.Event()
        self.answer = answer
        ae = AE(ae_title="SCP")
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ABORTED, self._aborted)],
        )

    def _store(self, event: evt.Event) -> Any:
        self.received.append(
            (
                int(event.request.MessageID),
                str(event.request.AffectedSOPInstanceUID),
                bytes(event.request.DataSet.getvalue()),
            )
        )
        return self.answer(event) if self.answer else 0x0000

    def _aborted(self, event: evt.Event) -> None:
        self.aborted.set()

    def stop(self) -> None:
        self.server.shutdown()


def _associate(port: int, timeout_s: float = 10.0) -> tuple[Any, FileStore, int]:
    ae = AE(ae_title="NODE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    store = FileStore(assoc, timeout_s)
    store.install()
    return assoc, store, int(assoc.accepted_contexts[0].context_id)


def test_the_command_set_reads_back_as_a_c_store_rq():
    sop_uid = "1.2.826.0.1.3680043.8.498.1"  # odd length: padded with NUL
    command = encode_store_request(CTImageStorage, sop_uid, 7)
    ds = read_dataset(io.BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(command) - 12
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CTImageStorage, sop_uid)
    assert (ds.CommandField, ds.MessageID, ds.Priority) == (0x0001, 7, 0x0000)
    assert ds.CommandDataSetType != 0x0101  # a data set follows
    assert len(command) % 2 == 0


def test_data_set_offset_is_where_pydicom_finds_the_data_set(tmp_path):
    _, path = _file(tmp_path)
    assert data_set_offset(path) == split_dataset(path)[1]
    raw = tmp_path / "no_meta.dcm"
    raw.write_bytes(path.read_bytes()[data_set_offset(path) :])
    with pytest.raises(NotStorable):
        data_set_offset(raw)


def test_storescp_receives_the_data_set_byte_for_byte_in_4_kib_pdus(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen(
        [_storescp(), "-aet", "SCP", "-pdu", "4096", "+B", "-od", str(out), str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(lambda: _listening(port), 10, "storescp listening")
        files = [_file(tmp_path, i)[1] for i in range(3)]
        assoc, store, context_id = _associate(port)
        assert assoc.acceptor.maximum_length == 4096
        for path in files:
            meta = pydicom.filereader.read_file_meta_info(path)
            answer = store.store(
                path, data_set_offset(path), context_id, CTImageStorage,
                str(meta.MediaStorageSOPInstanceUID),
            )  # fmt: skip
            assert answer == StoreResponse(0x0000)
        assoc.release()
        assert assoc.is_released
    finally:
        scp.terminate()
        scp.wait(10)
    received = {p.name.split(".", 1)[1]: p for p in out.iterdir()}
    assert len(received) == 3
    for path in files:
        uid = pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID
        assert _data_set_bytes(received[uid]) == _data_set_bytes(path)


def _storescp() -> str:
    """DCMTK's storescp (the virtualenv's bin, first on PATH in ./run.sh, has
    pynetdicom's look-alike, which takes other options)."""
    exe = dcmtk_tool("storescp")
    if exe is None:
        pytest.fail("DCMTK storescp is not installed (apt-get install dcmtk)")
    return exe


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("fragments", [1, 2, 0])
def test_fragment_boundaries_and_no_pdu_limit(tmp_path, fragments):
    """A data set that fills exactly one or two fragments, and a destination with no
    limit (Maximum Length Received 0): every byte arrives, in one message each."""
    ds, path = _file(tmp_path, rows=64)
    length = len(_data_set_bytes(path))
    if fragments == 2 and length % 2:
        ds.ImageComments = "x"  # an even length for two equal fragments
        write(ds, path)
        length = len(_data_set_bytes(path))
    max_pdu = 0 if fragments == 0 else length // fragments + 6
    scp = _Scp(max_pdu=max_pdu)
    try:
        assoc, store, context_id = _associate(scp.port)
        assert assoc.acceptor.maximum_length == max_pdu
        answer = store.store(
            path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
        )
        assert answer == StoreResponse(0x0000)
        assoc.release()
    finally:
        scp.stop()
    assert [(uid, data) for _, uid, data in scp.received] == [
        (ds.SOPInstanceUID, _data_set_bytes(path))
    ]


def test_message_ids_count_up_on_one_association(tmp_path):
    scp = _Scp()
    try:
        assoc, store, context_id = _associate(scp.port)
        for index in range(4):
            ds, path = _file(tmp_path, index, rows=16)
            answer = store.store(
                path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
            )
            assert answer is not None and answer.status == 0
        assoc.release()
    finally:
        scp.stop()
    assert [message_id for message_id, _, _ in scp.received] == [1, 2, 3, 4]


def test_a_refusal_carries_the_destinations_error_comment(tmp_path):
    def refuse(event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = 0xC123
        status.ErrorComment = "no room for CT"
        return status

    scp = _Scp(answer=refuse)
    try:
        assoc, store, context_id = _associate(scp.port)
        ds, path = _file(tmp_path, rows=16)
        answer = store.store(
            path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
        )
        assert answer == StoreResponse(0xC123, "no room for CT")
        assoc.release()
    finally:
        scp.stop()


def test_a_destination_that_never_answers_is_aborted_after_the_timeout(tmp_path):
    release = threading.Event()

    def hang(event: evt.Event) -> int:
        release.wait(20)
        return 0x0000

    scp = _Scp(answer=hang)
    try:
        assoc, store, context_id = _associate(scp.port, timeout_s=1.0)
        ds, path = _file(tmp_path, rows=16)
        started = time.monotonic()
        answer = store.store(
            path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
        )
        waited_s = time.monotonic() - started
        assert answer is None
        assert 1.0 <= waited_s < 3.0, waited_s
        assert not assoc.is_established
        release.set()  # the SCP's handler returns; its association then ends aborted
        assert scp.aborted.wait(5), "the destination saw no A-ABORT"
    finally:
        release.set()
        scp.stop()


def test_an_abort_during_the_wait_ends_it_at_once(tmp_path):
    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0x0000

    scp = _Scp(answer=abort)
    try:
        assoc, store, context_id = _associate(scp.port, timeout_s=30.0)
        ds, path = _file(tmp_path, rows=16)
        started = time.monotonic()
        answer = store.store(
            path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
        )
        assert answer is None
        assert time.monotonic() - started < 3.0
        assert assoc.is_aborted
    finally:
        scp.stop()


def test_the_dispatcher_records_the_refusal_with_its_comment(db, tmp_path):
    def refuse(event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = 0xA900
        status.ErrorComment = "SOP class mismatch"
        return status

    scp = _Scp(answer=refuse)
    try:
        dest = Destination(name="pacs", ae_title="SCP", host="127.0.0.1", port=scp.port)
        dispatcher = Dispatcher(db, {"pacs": dest}, DispatchSettings(timeout_s=5), "NODE")
        ds, path = _file(tmp_path, rows=16)
        with db.session() as s:
            s.add(
                Dispatch(
                    kind="result", sop_uid=ds.SOPInstanceUID, sop_class_uid=CTImageStorage,
                    path=str(path), destination="pacs",
                )
            )  # fmt: skip
        assert dispatcher.poll() == 1
    finally:
        scp.stop()
    with db.session() as s:
        row = s.scalars(select(Dispatch)).one()
        assert (row.state, row.last_status) == ("failed", 0xA900)
        assert row.last_error == "refused 0xA900: SOP class mismatch"


def test_a_destination_that_stops_reading_does_not_hold_the_sender(tmp_path):
    """storescp stopped (SIGSTOP) after the association: a 32 MB data set fills the
    socket buffers; the write gives up after the timeout and the association is
    aborted, instead of blocking the sender for ever."""
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    scp = subprocess.Popen(
        [_storescp(), "-aet", "SCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _listening(port), 10, "storescp listening")
        ds, path = _file(tmp_path, rows=4096)
        assoc, store, context_id = _associate(port, timeout_s=2.0)
        os.kill(scp.pid, signal.SIGSTOP)
        started = time.monotonic()
        answer = store.store(
            path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
        )
        waited_s = time.monotonic() - started
        assert answer is None
        assert waited_s < 10.0, waited_s
        assert not assoc.is_established
    finally:
        os.kill(scp.pid, signal.SIGCONT)
        scp.terminate()
        scp.wait(10)


def test_an_answer_split_over_several_pdus_is_read_too(tmp_path):
    """The requestor's PDU limit makes pynetdicom's SCP split its C-STORE-RSP command
    set over several P-DATA-TF PDUs: pynetdicom assembles it, and the sender takes it
    from there (no fragment is taken for a whole answer)."""
    scp = _Scp()
    try:
        ae = AE(ae_title="NODE")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        # A command set of ~160 bytes in fragments of at most 58.
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=64)
        assert assoc.is_established
        store = FileStore(assoc, 10.0)
        store.install()
        context_id = int(assoc.accepted_contexts[0].context_id)
        for index in range(3):
            ds, path = _file(tmp_path, index, rows=16)
            started = time.monotonic()
            answer = store.store(
                path, data_set_offset(path), context_id, CTImageStorage, ds.SOPInstanceUID
            )
            assert answer == StoreResponse(0x0000)
            assert time.monotonic() - started < 2.0
        assoc.release()
        assert assoc.is_released
    finally:
        scp.stop()
    assert len(scp.received) == 3
