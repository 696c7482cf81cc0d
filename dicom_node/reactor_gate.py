"""An event-driven stand-in for a pynetdicom association's reactor checkpoint.

pynetdicom 3.0.4's association reactor (``Association._run_reactor``) sleeps 1 ms, then
calls ``_reactor_checkpoint.wait()`` (a ``threading.Event`` other threads ``clear()`` to
pause it and ``set()`` to let it go on), then looks for work: a request to serve, a
release, an abort. Looking 1,000 times a second per association costs CPU and interpreter
lock hand-overs for nothing. ``ReactorGate`` keeps the pause semantics, but its ``wait()``
first waits up to ``wait_s`` for ``nudge()``: the queues the reactor reads call it when
something is put on them (``dicom_node.listener.Wakeups`` for received associations,
``dicom_node.store_send.FileStore`` for the senders').
"""

from __future__ import annotations

import threading


class ReactorGate:
    """``_reactor_checkpoint`` with a wait for work (module docstring); ``wait_s``: how
    long the reactor waits before it looks round anyway (its timers, a DUL that ended)."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._go = threading.Event()
        self._go.set()
        self._nudged = threading.Event()

    def nudge(self) -> None:
        """Something was queued for the reactor: its wait ends now."""
        self._nudged.set()

    def set(self) -> None:
        self._go.set()
        self._nudged.set()

    def clear(self) -> None:
        self._go.clear()

    def is_set(self) -> bool:
        return self._go.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        self._nudged.wait(self.wait_s)
        self._nudged.clear()
        return self._go.wait(timeout)
