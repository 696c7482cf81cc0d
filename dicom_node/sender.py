"""What every destination sender shares, whatever it speaks (C-STORE in
``dicom_node.dispatch``, STOW-RS in ``dicom_node.dispatch_dicomweb``): its name, its wake
event and the loop that calls ``send_due`` until the node stops."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from db.session import Database
from kernel import outbox
from kernel.settings import Destination, DispatchSettings

log = logging.getLogger("dicom_node.dispatch")


class SenderHost(Protocol):
    """What a sender needs of its dispatcher (``dicom_node.dispatch.Dispatcher``)."""

    db: Database
    settings: DispatchSettings
    name: str


class Sender:
    """One of ``dest``'s ``max_associations`` senders (``slot``). Subclasses implement
    ``send_due(stop) -> rows attempted``; ``wake`` (set by the dispatcher on new rows)
    cuts the wait between two empty rounds short."""

    def __init__(self, host: SenderHost, dest: Destination, slot: int) -> None:
        self.dest = dest
        self.db = host.db
        self.settings = host.settings
        self.name = f"{host.name}/{dest.name}#{slot}"
        self.wake = threading.Event()
        self._carried: dict[str, outbox.Carried] = {}

    def send_due(self, stop: threading.Event | None = None) -> int:
        raise NotImplementedError

    def run_forever(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Send what is due, again at once while there was something, else after
        ``interval_s`` or a wake, until ``stop``. An error is logged, never ends the loop."""
        while not stop.is_set():
            try:
                sent = self.send_due(stop)
            except Exception:
                log.exception("sending to %s failed", self.dest.name)
                sent = 0
            if not sent:
                self.wake.wait(interval_s)
                self.wake.clear()
