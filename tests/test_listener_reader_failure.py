"""An association whose reader fails mid-transfer (an error in the node's own code while a
PDU is read or handled) is ended and reported at once.

pynetdicom's reader catches an error in its read step, sends an A-ABORT and stops; an
error in its state machine ends the reader thread. In neither case does it close the
socket or trigger EVT_ABORTED, so the listener counted the association as open, kept its
series "still arriving" (routing waits for it) and wrote no audit record until the next
association came. Faults are injected into the node's reader with ``monkeypatch``; the
listener, storescu and the database are real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom.fsm import StateMachine

import dicom_node.listener as listener_module
from tests.conftest import storescu, wait_until
from tests.dicom_factory import ct_series
from tests.test_listener_hardening import Listener
from tests.test_listener_hardening import listener as listener  # the fixture

INSTANCES = 6


def _fail_on_call(original, failing_call: int, matches=lambda *a: True):
    """``original`` wrapped to raise RuntimeError on its ``failing_call``-th matching call."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if matches(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call:
                raise RuntimeError("injected fault in the reader")
        return original(*args, **kwargs)

    return wrapper


def _assert_ended_and_reported(lst: Listener, tmp_path: Path) -> None:
    facts = wait_until(lambda: lst.closed and lst.closed[0], 10, "the association reported")
    assert facts.outcome == "accepted" and facts.ended == "aborted"
    # Acknowledged ones kept (their rows are written in batches), none invented.
    stored = facts.instances_stored
    assert 0 < stored < INSTANCES
    wait_until(lambda: lst.instances() == stored, 10, f"{stored} instance rows")
    # Routing no longer waits for the series (released once its rows are recorded).
    wait_until(lambda: lst.scp.tracker.open_series() == set(), 10, "the series released")
    assert lst.scp.slots.in_use == 0
    # The listener keeps serving: the sender's retry completes the series.
    again = storescu(ct_series(tmp_path / "again", INSTANCES), lst.port)
    assert again.returncode == 0, again.stderr
    assert lst.instances() == stored + INSTANCES


@pytest.mark.parametrize("failing_call", [3, 6])
def test_an_error_the_reader_catches_ends_and_reports_the_association(
    listener, monkeypatch, tmp_path, failing_call
):
    lst = listener()
    monkeypatch.setattr(
        listener_module.Wakeups,
        "_deliver_p_data",
        _fail_on_call(listener_module.Wakeups._deliver_p_data, failing_call),
    )
    sent = storescu(ct_series(tmp_path / "s", INSTANCES), lst.port)
    assert sent.returncode != 0  # storescu saw the abort
    monkeypatch.undo()
    _assert_ended_and_reported(lst, tmp_path)


def test_an_error_that_ends_the_reader_thread_ends_and_reports_the_association(
    listener, monkeypatch, tmp_path
):
    """The state machine raising (outside pynetdicom's guard): the reader thread dies;
    the peer gets an A-ABORT and the association is reported as aborted."""
    lst = listener()
    # Evt10: a P-DATA-TF received. With a data-receive handler bound, every P-DATA takes
    # pynetdicom's path through the state machine (listener._plain_pdu_events).
    monkeypatch.setattr(
        StateMachine,
        "do_action",
        _fail_on_call(StateMachine.do_action, 4, lambda self, event: event == "Evt10"),
    )
    monkeypatch.setattr(listener_module, "_plain_pdu_events", lambda assoc: False)
    sent = storescu(ct_series(tmp_path / "s", INSTANCES), lst.port)
    assert sent.returncode != 0
    assert "Peer aborted Association" in sent.stdout + sent.stderr
    monkeypatch.undo()
    _assert_ended_and_reported(lst, tmp_path)
