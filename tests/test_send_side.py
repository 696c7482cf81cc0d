"""The send side under failure (issue 17), against real pynetdicom storage SCPs.

- A destination that accepts the association and then does not answer holds up only its
  own rows: results for a healthy destination go out within seconds meanwhile.
- kill -9 of ``dicom-node serve`` in the middle of a batch: after a restart every row is
  sent, every instance arrived, and only instances whose answer the node had not
  recorded (at most one per association) arrived twice. A separate SCP process counts
  every C-STORE it receives.
- Rows for a destination removed from the settings fail, saying so; rows a sender had
  claimed but not tried when the node stops are pending again, with no attempt counted.
- A destination that does not answer is waited for until ``dispatch.max_age_s``, past
  ``max_attempts``, which bounds only the refusals it answers (0xA7xx).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select

from db.models import Dispatch, Event, utcnow
from db.session import Database
from devkit.net import free_port, wait_for_port
from dicom_node.dispatch import Dispatcher
from dicom_node.service import Node
from kernel import outbox
from kernel.settings import Destination, DispatchSettings
from kernel.vocabulary import OutboxKind, SendCause
from tests.conftest import node_settings, wait_until
from tests.dicom_factory import ct_slice, write
from tests.logging_store_scp import LoggingStoreSCP, read_log
from tests.test_receive_durability import Serve

INTERRUPTED = "when the node stopped"


def _objects(folder: Path, n: int) -> list[tuple[str, str, str]]:
    """``n`` small CT instances on disk as outbox objects (SOP UID, class, path)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = ct_slice(study, series, i)
        out.append((ds.SOPInstanceUID, CTImageStorage, str(write(ds, folder / f"{i:04d}.dcm"))))
    return out


def _queue_results(db: Database, objects: list[tuple[str, str, str]], names: list[str]) -> None:
    """Results queued as the job runner queues them: one row per destination each."""
    with db.session() as s:
        for sop_uid, sop_class, path in objects:
            outbox.queue(
                s, study_id=None, kind=OutboxKind.RESULT, sop_uid=sop_uid,
                sop_class_uid=sop_class, path=path, destinations=names,
            )  # fmt: skip


def _queue_forwards(db: Database, objects: list[tuple[str, str, str]], name: str) -> None:
    with db.session() as s:
        outbox.queue_many(
            s, study_id=None, kind=OutboxKind.FORWARD, objects=objects, destination=name
        )


def _rows(db: Database, destination: str | None = None) -> list[Dispatch]:
    with db.session() as s:
        query = select(Dispatch).order_by(Dispatch.id)
        if destination is not None:
            query = query.where(Dispatch.destination == destination)
        return list(s.scalars(query))


def _states(db: Database, destination: str | None = None) -> Counter[str]:
    return Counter(r.state for r in _rows(db, destination))


def _events(db: Database, kind: str) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Event.message).where(Event.kind == kind)))


def _modelless(tmp_path: Path) -> dict[str, Any]:
    models, rules = tmp_path / "models.yaml", tmp_path / "rules.yaml"
    models.write_text("models: {}\n")
    rules.write_text("rules: []\n")
    return {
        "models_file": models,
        "rules_file": rules,
        "worker": {"enabled": False},
        "web": {"enabled": False},
        "health": {"echo_interval_s": 0},
    }


def _destination(name: str, scp: LoggingStoreSCP, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "LOGSCP", "host": "127.0.0.1", "port": scp.port, **extra}


def test_a_destination_that_does_not_answer_holds_up_only_its_own_rows(tmp_path):
    """The slow PACS takes the association and the first C-STORE, then answers nothing
    (until ``dispatch.timeout_s``, 60 s here); the healthy PACS gets both bursts of
    results within seconds meanwhile."""
    slow = LoggingStoreSCP(free_port()).start()
    slow.gate.clear()  # answers nothing until the gate opens
    healthy = LoggingStoreSCP(free_port()).start()
    node = None
    try:
        node = Node(
            node_settings(
                tmp_path,
                **_modelless(tmp_path),
                destinations=[_destination("slow", slow), _destination("pacs", healthy)],
                dispatch={"retry_initial_s": 0.5, "retry_max_s": 2.0, "timeout_s": 60},
            ),
            stop_grace_s=5,
        ).start()
        first = _objects(tmp_path / "first", 10)
        started = time.monotonic()
        _queue_results(node.db, first, ["slow", "pacs"])
        node.dispatcher.wake.set()
        wait_until(lambda: _states(node.db, "pacs") == {"sent": 10}, 20, "first burst sent")
        first_s = time.monotonic() - started
        assert set(healthy.received) == {sop for sop, _, _ in first}
        assert slow.waiting >= 1, "the slow destination answered"
        assert _states(node.db, "slow")["sent"] == 0

        # A second burst while the slow destination still holds its association.
        second = _objects(tmp_path / "second", 10)
        started = time.monotonic()
        _queue_results(node.db, second, ["slow", "pacs"])
        node.dispatcher.wake.set()
        wait_until(lambda: _states(node.db, "pacs") == {"sent": 20}, 20, "second burst sent")
        second_s = time.monotonic() - started
        assert slow.waiting >= 1 and _states(node.db, "slow")["sent"] == 0
        assert sorted(healthy.received) == sorted(sop for sop, _, _ in first + second)

        slow.gate.set()  # it answers again: its rows follow
        wait_until(lambda: _states(node.db, "slow") == {"sent": 20}, 60, "slow rows sent")
        assert Counter(slow.received) == Counter(sop for sop, _, _ in first + second)
        print(f"\nhealthy destination: bursts of 10 sent in {first_s:.1f} s and {second_s:.1f} s")
    finally:
        slow.gate.set()
        if node is not None:
            node.stop()
        slow.close()
        healthy.close()


class _LoggingSCPProcess:
    """``tests.logging_store_scp`` in its own process."""

    def __init__(self, log: Path, delay_s: float) -> None:
        self.port = free_port()
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.logging_store_scp", str(self.port), str(log),
             "--delay-s", str(delay_s)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 30)

    def received(self) -> list[str]:
        return read_log(self.log)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _serve_with_destination(data_dir: Path, tmp_path: Path, scp_port: int) -> Serve:
    node = Serve(data_dir, processes=1)
    destination = {
        "name": "logscp", "ae_title": "LOGSCP", "host": "127.0.0.1", "port": scp_port,
        "max_associations": 2,
    }  # fmt: skip
    models, rules = tmp_path / "models.yaml", tmp_path / "rules.yaml"
    models.write_text("models: {}\n")
    rules.write_text("rules: []\n")
    node.env.update(
        DICOM_NODE_MODELS_FILE=str(models),
        DICOM_NODE_RULES_FILE=str(rules),
        DICOM_NODE_DESTINATIONS=json.dumps([destination]),
        DICOM_NODE_DISPATCH__RETRY_INITIAL_S="0.5",
        DICOM_NODE_DISPATCH__RETRY_MAX_S="2",
    )
    return node


def _db_states(node: Serve) -> dict[str, str]:
    with node.db() as conn:
        return dict(conn.execute("SELECT sop_uid, state FROM dispatches").fetchall())


def test_kill_9_mid_batch_resends_only_what_was_in_flight(tmp_path):
    batch, max_associations = 80, 2
    scp = _LoggingSCPProcess(tmp_path / "stores.log", delay_s=0.15)
    data_dir = tmp_path / "data"
    node = _serve_with_destination(data_dir, tmp_path, scp.port)
    try:
        node.start()
        objects = _objects(tmp_path / "out", batch)
        db = Database(f"sqlite:///{data_dir / 'node.db'}")
        try:
            _queue_forwards(db, objects, "logscp")  # the node's next poll (<= 1 s) sends
        finally:
            db.dispose()
        wait_until(lambda: len(scp.received()) >= 20, 60, "20 C-STOREs at the logging SCP")
        node.kill9()

        before = _db_states(node)
        arrived_before = set(scp.received())
        sent_before = {sop for sop, state in before.items() if state == "sent"}
        left_sending = sum(state == "sending" for state in before.values())
        assert len(arrived_before) < batch, "the kill came after the batch"
        # Arrived but not recorded as sent: the C-STOREs whose answer the node had not
        # recorded when it died, one per association at most.
        in_flight = arrived_before - sent_before
        assert sent_before <= arrived_before
        assert len(in_flight) <= max_associations, in_flight

        node = _serve_with_destination(data_dir, tmp_path, scp.port).start()
        wait_until(
            lambda: set(_db_states(node).values()) == {"sent"}, 60, "every row sent after restart"
        )
        time.sleep(1.0)  # a stray send would arrive by now
        counts = Counter(scp.received())
        assert set(counts) == {sop for sop, _, _ in objects}, "an instance never arrived"
        duplicates = {sop: n for sop, n in counts.items() if n > 1}
        assert set(duplicates) <= in_flight, "an instance recorded as sent was sent again"
        assert sum(n - 1 for n in duplicates.values()) <= max_associations
        with node.db() as conn:
            interrupted = [
                m for (m,) in conn.execute("SELECT message FROM events WHERE kind = 'send_retry'")
                if INTERRUPTED in m
            ]  # fmt: skip
        assert len(interrupted) == left_sending
        print(
            f"\nkill -9 after {len(arrived_before)} of {batch} C-STOREs arrived: "
            f"{len(sent_before)} recorded sent, {left_sending} left sending, "
            f"{len(in_flight)} in flight; after restart {sum(counts.values())} C-STOREs, "
            f"{sum(n - 1 for n in duplicates.values())} duplicate(s)"
        )
    finally:
        node.stop()
        scp.stop()


def test_rows_for_a_removed_destination_fail_with_a_reason(tmp_path):
    pacs = LoggingStoreSCP(free_port()).start()
    node = None
    try:
        settings = node_settings(
            tmp_path, **_modelless(tmp_path), destinations=[_destination("pacs", pacs)]
        )
        node = Node(settings, stop_grace_s=5).start()
        objects = _objects(tmp_path / "out", 3)
        _queue_results(node.db, objects, ["old_pacs", "pacs"])
        node.dispatcher.wake.set()
        wait_until(lambda: _states(node.db) == {"failed": 3, "sent": 3}, 20, "rows settled")
        for row in _rows(node.db, "old_pacs"):
            assert (row.state, row.attempts) == ("failed", 1)
            assert row.last_error == "destination 'old_pacs' unknown"
        failed = _events(node.db, "send_failed")
        assert len(failed) == 3 and all("old_pacs" in m and "unknown" in m for m in failed)
        assert sorted(pacs.received) == sorted(sop for sop, _, _ in objects)
    finally:
        if node is not None:
            node.stop()
        pacs.close()


def test_rows_claimed_but_not_tried_are_pending_again_when_the_node_stops(tmp_path):
    pacs = LoggingStoreSCP(free_port(), delay_s=0.3).start()
    settings = node_settings(
        tmp_path,
        **_modelless(tmp_path),
        destinations=[_destination("pacs", pacs, max_associations=1)],
    )
    node = Node(settings, stop_grace_s=10).start()
    try:
        objects = _objects(tmp_path / "out", 30)
        _queue_results(node.db, objects, ["pacs"])
        node.dispatcher.wake.set()
        wait_until(lambda: _states(node.db)["sent"] >= 3, 30, "three rows sent")
        claimed = {r.id for r in _rows(node.db) if r.state == "sending"}
    finally:
        node.stop()
    assert len(claimed) >= 2, "the sender had no claimed rows left to release"
    rows = _rows(node.db)
    states = Counter(r.state for r in rows)
    assert set(states) == {"sent", "pending"}, states
    # What went over the wire is exactly what is recorded sent (the C-STORE in flight at
    # the stop finished and was recorded).
    assert sorted(pacs.received) == sorted(r.sop_uid for r in rows if r.state == "sent")
    released = [r for r in rows if r.id in claimed and r.state == "pending"]
    assert released, "every claimed row was sent before the stop"
    for row in released:
        assert (row.attempts, row.last_attempt_at, row.last_error) == (0, None, None)
        assert (row.sending_by, row.sending_since) == (None, None)
    assert not any(INTERRUPTED in m for m in _events(node.db, "send_retry"))

    # The next start sends the rest, each once, and finds nothing interrupted.
    again = Node(settings, stop_grace_s=10).start()
    try:
        wait_until(lambda: _states(again.db) == {"sent": 30}, 60, "the rest sent")
        assert not any(INTERRUPTED in m for m in _events(again.db, "send_retry"))
    finally:
        again.stop()
        pacs.close()
    assert Counter(pacs.received) == Counter({sop: 1 for sop, _, _ in objects})
    print(f"\nstop with {len(released)} claimed rows untried: pending again, no attempt counted")


def test_the_association_reactor_leaves_responses_to_the_waiting_sender(tmp_path):
    """pynetdicom's reactor takes messages without blocking between pauses; a C-STORE
    response it took would be dropped and the sender would wait ``dispatch.timeout_s``
    (a race seen in the send benchmark). On the dispatcher's associations it cannot."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.dispatch import DestinationSender, Dispatcher
    from kernel.settings import Destination, DispatchSettings

    pacs = LoggingStoreSCP(free_port()).start()
    try:
        dest = Destination(name="pacs", ae_title="LOGSCP", host="127.0.0.1", port=pacs.port)
        db = Database(f"sqlite:///{tmp_path / 'node.db'}")  # not used by _associate
        dispatcher = Dispatcher(db, {"pacs": dest}, DispatchSettings(timeout_s=5), "NODE")
        assoc, why, _ = DestinationSender(dispatcher, dest, 0)._associate(
            {(CTImageStorage, ExplicitVRLittleEndian)}
        )
        assert assoc is not None, why
        try:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0x0000
            assoc.dimse.msg_queue.put((1, rsp))
            assert assoc.dimse.get_msg(block=False) == (None, None)  # what the reactor sees
            time.sleep(0.05)  # the reactor turns many times meanwhile
            assert assoc.dimse.get_msg(block=True) == (1, rsp)  # what send_c_store gets
        finally:
            assoc.release()
    finally:
        pacs.close()


@pytest.mark.parametrize("mixed", [False, True], ids=["all-sent", "with-a-retry"])
def test_a_result_replaced_while_it_was_being_sent_goes_again_in_its_new_version(
    db, tmp_path, mixed
):
    """A job run again queues its newer SEG for a row a sender has claimed (``sending``):
    the sender's outcome for the older file must not mark the row sent; it stays pending
    with the newer file and goes next. Both ways of recording (all rows sent; a chunk
    with a retry) behave alike."""
    settings = DispatchSettings()
    old, other = _objects(tmp_path / "old", 2)
    _queue_results(db, [old, other], ["pacs"])
    claimed = outbox.claim_due(db, 10, destination="pacs", sender="test/pacs#0")
    assert len(claimed) == 2
    newer = str(write(ct_slice(generate_uid(), generate_uid(), 0), tmp_path / "newer.dcm"))
    _queue_results(db, [(old[0], old[1], newer)], ["pacs"])  # the re-run's SEG, same SOP UID
    outcomes = {row.id: outbox.SendOutcome("sent", 0, "success") for row in claimed}
    if mixed:
        other_id = next(row.id for row in claimed if row.sop_uid == other[0])
        outcomes[other_id] = outbox.SendOutcome("retry", None, "association lost")
    outbox.record_outcomes(db, claimed, outcomes, settings)
    rows = {row.sop_uid: row for row in _rows(db)}
    replaced = rows[old[0]]
    assert replaced.state == "pending" and replaced.path == newer and replaced.sent_at is None
    assert replaced.attempts == 0 and replaced.sending_by is None
    assert rows[other[0]].state == ("pending" if mixed else "sent")
    assert rows[other[0]].attempts == 1
    assert any("a newer version was queued for pacs" in m for m in _events(db, "send_retry"))
    again = outbox.claim_due(db, 10, destination="pacs", sender="test/pacs#0")
    assert [(row.sop_uid, row.path) for row in again if row.sop_uid == old[0]] == [
        (old[0], newer)
    ]


def test_rows_after_a_timed_out_c_store_are_not_charged_an_attempt(db, tmp_path):
    """The destination takes the association and leaves the first C-STORE unanswered until
    ``dispatch.timeout_s``: that row is charged an attempt and retried after the backoff;
    the rest of the chunk was never tried, so it is pending again with no attempt and no
    error, and goes on the next association."""
    objects = _objects(tmp_path / "objects", 5)
    scp = LoggingStoreSCP(free_port(), hold_max_s=3.0).start()
    try:
        scp.gate.clear()  # the first request waits (3 s), past the 1 s DIMSE timeout
        settings = DispatchSettings(timeout_s=1, retry_initial_s=0.2, retry_max_s=0.5)
        dest = Destination(**_destination("pacs", scp))
        dispatcher = Dispatcher(db, {"pacs": dest}, settings, "DICOM_NODE")
        _queue_results(db, objects, ["pacs"])
        dispatcher.poll()
        rows = _rows(db)
        first, rest = rows[0], rows[1:]
        assert first.state == "pending" and first.attempts == 1 and first.last_error
        assert [(r.state, r.attempts, r.last_error) for r in rest] == [("pending", 0, None)] * 4
        scp.gate.set()
        wait_until(
            lambda: dispatcher.poll() >= 0 and _states(db) == Counter(sent=5), 20, "all sent"
        )
        assert [r.attempts for r in _rows(db)] == [2, 1, 1, 1, 1]
    finally:
        scp.close()


def test_rows_a_sender_could_not_finish_go_again_after_a_backoff(db, tmp_path):
    """A sender that fails itself mid-chunk: rows it recorded keep their outcome, the
    others get a retry with the error as reason (not ``sending`` until the next start)."""
    objects = _objects(tmp_path / "objects", 3)
    _queue_results(db, objects, ["pacs"])
    claimed = outbox.claim_due(db, 10, destination="pacs", sender="test/pacs#0")
    outbox.record_outcomes(
        db, claimed[:1], {claimed[0].id: outbox.SendOutcome("sent", 0, "success")},
        DispatchSettings(),
    )  # fmt: skip
    assert outbox.retry_claimed(db, claimed, "sender error: OSError()", DispatchSettings()) == 2
    rows = _rows(db)
    assert [(r.state, r.attempts) for r in rows] == [("sent", 1), ("pending", 1), ("pending", 1)]
    assert all(r.last_error == "sender error: OSError()" for r in rows[1:])


# -- how long a destination is waited for (dispatch.max_age_s, max_attempts) --------------

NO_ANSWER = outbox.SendOutcome(
    "retry", None, "association refused or aborted (destination down?)", SendCause.NO_ANSWER
)
OUT_OF_RESOURCES = outbox.SendOutcome("retry", 0xA700, "out of resources 0xA700")
SHORT = DispatchSettings(max_attempts=3, max_age_s=3600, retry_initial_s=1, retry_max_s=4)


def _attempt(db: Database, outcome: outbox.SendOutcome) -> Dispatch:
    """One attempt of the one queued row: its backoff skipped, claimed, ``outcome``
    recorded; the row as it is then."""
    with db.session() as s:
        s.scalars(select(Dispatch)).one().next_attempt_at = utcnow()
    claimed = outbox.claim_due(db, 10, destination="pacs", sender="test/pacs#0")
    assert len(claimed) == 1
    outbox.record_outcomes(db, claimed, {claimed[0].id: outcome}, SHORT)
    return _rows(db)[0]


def test_a_destination_that_does_not_answer_is_retried_until_max_age_not_max_attempts(
    db, tmp_path
):
    """A PACS down for a maintenance window: unanswered sends go on past max_attempts
    (3 here) with the capped backoff, and the row fails only when it is max_age_s old."""
    _queue_results(db, _objects(tmp_path / "objects", 1), ["pacs"])
    for n in range(1, 11):
        row = _attempt(db, NO_ANSWER)
        assert (row.state, row.attempts, row.unanswered, row.last_cause) == (
            "pending", n, n, "no answer"
        )  # fmt: skip
    assert 1.5 < (row.next_attempt_at - utcnow()).total_seconds() <= 4  # capped, jitter
    assert not _events(db, "send_failed")
    with db.session() as s:  # the outage outlasts max_age_s
        s.scalars(select(Dispatch)).one().queued_at = utcnow() - timedelta(seconds=3601)
    row = _attempt(db, NO_ANSWER)
    assert (row.state, row.attempts) == ("failed", 11)
    assert "max_age_s=3600" in row.last_error
    assert len(_events(db, "send_failed")) == 1


def test_refusals_the_destination_answers_still_stop_at_max_attempts(db, tmp_path):
    """0xA7xx out of resources is retried max_attempts times, also when the row waited
    out an outage first: the unanswered attempts do not use up its refusals."""
    _queue_results(db, _objects(tmp_path / "objects", 1), ["pacs"])
    assert [_attempt(db, OUT_OF_RESOURCES).state for _ in range(3)] == [
        "pending", "pending", "failed"
    ]  # fmt: skip
    row = _rows(db)[0]
    assert (row.attempts, row.unanswered, row.last_status) == (3, 0, 0xA700)

    assert outbox.resend(db, [row.id]) == 1  # a fresh delivery: counts start again
    for _ in range(5):
        assert _attempt(db, NO_ANSWER).state == "pending"
    states = [_attempt(db, OUT_OF_RESOURCES).state for _ in range(3)]
    assert states == ["pending", "pending", "failed"]
    row = _rows(db)[0]
    assert (row.attempts, row.unanswered) == (8, 5)
    assert any("after 8 attempts (5 not answered" in m for m in _events(db, "send_failed"))


def test_sends_to_a_closed_port_wait_past_max_attempts_and_go_when_it_opens(db, tmp_path):
    """Through the dispatcher, against a real port: connection refused 6 times with
    max_attempts=2 leaves the rows pending; once a storage SCP listens there and the
    destination is seen answering (``due_now``), they are delivered."""
    objects = _objects(tmp_path / "objects", 2)
    port = free_port()
    dest = Destination(name="pacs", ae_title="LOGSCP", host="127.0.0.1", port=port)
    settings = DispatchSettings(max_attempts=2, retry_initial_s=60, timeout_s=5)
    dispatcher = Dispatcher(db, {"pacs": dest}, settings, "DICOM_NODE")
    _queue_results(db, objects, ["pacs"])
    for _ in range(6):
        with db.session() as s:
            for row in s.scalars(select(Dispatch)):
                row.next_attempt_at = utcnow()
        assert dispatcher.poll() == 2
    assert [(r.state, r.attempts, r.unanswered) for r in _rows(db)] == [("pending", 6, 6)] * 2
    assert dispatcher.poll() == 0  # waiting out the backoff (60 s and more)
    scp = LoggingStoreSCP(port).start()
    try:
        assert outbox.due_now(db, "pacs") == 2
        assert dispatcher.poll() == 2
        assert [(r.state, r.attempts, r.last_cause) for r in _rows(db)] == [
            ("sent", 7, "destination")
        ] * 2
        assert sorted(scp.received) == sorted(sop for sop, _, _ in objects)
    finally:
        scp.close()


def test_a_destination_that_answers_again_gets_its_waiting_rows_at_once(db, tmp_path):
    """PACS down: three rows wait out a 60 s backoff. It comes back and a new result goes
    on a fresh association: the three waiting rows go with it, not a minute later (or at
    the next C-ECHO). A row the destination itself refused keeps its backoff."""
    port = free_port()
    settings = DispatchSettings(retry_initial_s=60, retry_max_s=60, timeout_s=5)
    dest = Destination(name="pacs", ae_title="LOGSCP", host="127.0.0.1", port=port)
    dispatcher = Dispatcher(db, {"pacs": dest}, settings, "DICOM_NODE")
    waiting = _objects(tmp_path / "waiting", 3)
    _queue_results(db, waiting, ["pacs"])
    dispatcher.poll()  # nobody listens: refused, unanswered, 60 s backoff
    assert _states(db) == Counter(pending=3)
    refused = _objects(tmp_path / "refused", 1)
    _queue_results(db, refused, ["pacs"])
    (row,) = [r for r in _rows(db) if r.sop_uid == refused[0][0]]
    claimed = outbox.claim_due(db, 1, destination="pacs", sender="test")
    outbox.record_outcomes(
        db, claimed, {row.id: outbox.SendOutcome("retry", 0xA700, "refused 0xA700")}, settings
    )
    scp = LoggingStoreSCP(port).start()
    try:
        fresh = _objects(tmp_path / "fresh", 1)
        _queue_results(db, fresh, ["pacs"])
        dispatcher.poll()
        assert sorted(scp.received) == sorted(uid for uid, _, _ in waiting + fresh)
        assert _states(db) == Counter(sent=4, pending=1)
    finally:
        scp.close()
