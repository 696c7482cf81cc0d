"""A storage SCP that logs every C-STORE it receives, for send-side tests.

    python -m tests.logging_store_scp PORT LOG_FILE [--delay-s 0.15] [--aet LOGSCP]

One line per C-STORE request, its SOP Instance UID, written and flushed as soon as the
request has arrived and before the answer, which comes ``--delay-s`` later (Success). A
sender killed while it waits for an answer therefore leaves a line for an instance whose
answer it never saw: the log counts what arrived, including duplicates. Takes CT Image
Storage in explicit and implicit VR little endian; runs until SIGTERM. ``LoggingStoreSCP``
is the same SCP inside the test process, with a gate to hold answers back.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt


class LoggingStoreSCP:
    """A pynetdicom storage SCP on 127.0.0.1:``port``.

    ``received``: SOP Instance UIDs in arrival order (duplicates kept); with ``log_path``
    each is also appended to that file. Each answer waits ``delay_s``, then, while
    ``gate`` is cleared, until it is set (at most ``hold_max_s``): a destination that
    accepts an association and then does not answer.
    """

    def __init__(
        self,
        port: int,
        aet: str = "LOGSCP",
        delay_s: float = 0.0,
        log_path: Path | None = None,
        hold_max_s: float = 300.0,
    ) -> None:
        self.port = port
        self.delay_s = delay_s
        self.hold_max_s = hold_max_s
        self.received: list[str] = []
        self.waiting = 0  # requests held at the gate now
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115
        self.ae = AE(ae_title=aet)
        self.ae.maximum_pdu_size = 0
        self.ae.add_supported_context(
            CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        self.server = None

    def start(self, block: bool = False) -> LoggingStoreSCP:
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        if block:
            self.ae.start_server(("127.0.0.1", self.port), block=True, evt_handlers=handlers)
        else:
            self.server = self.ae.start_server(
                ("127.0.0.1", self.port), block=False, evt_handlers=handlers
            )
        return self

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received.append(uid)
            if self._log is not None:
                self._log.write(uid + "\n")
                self._log.flush()
        if self.delay_s:
            time.sleep(self.delay_s)
        if not self.gate.is_set():
            with self._lock:
                self.waiting += 1
            self.gate.wait(self.hold_max_s)
            with self._lock:
                self.waiting -= 1
        return 0x0000

    def close(self) -> None:
        self.gate.set()
        if self.server is not None:
            self.server.shutdown()
        if self._log is not None:
            self._log.close()


def read_log(path: Path) -> list[str]:
    """The SOP Instance UIDs a logging SCP wrote, in arrival order (duplicates kept); a
    line still being written is not counted."""
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n")[:-1] if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("log", type=Path)
    parser.add_argument("--delay-s", type=float, default=0.15)
    parser.add_argument("--aet", default="LOGSCP")
    args = parser.parse_args()
    LoggingStoreSCP(args.port, args.aet, args.delay_s, args.log).start(block=True)


if __name__ == "__main__":
    main()
