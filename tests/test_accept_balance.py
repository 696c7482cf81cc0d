"""Receiving processes share one listening socket; one that holds more connections than
another leaves a new connection to that one for a moment (``GuardedServer.get_request``),
so a burst of associations spreads evenly (issue 17: 5 and 3 of 8 were seen, and the run
was as slow as the process with 5). Here two servers on one inherited socket stand for
two processes, with the shared counts the processes use."""

from __future__ import annotations

import multiprocessing
import socket
import time

from pynetdicom import AE, StoragePresentationContexts

from dicom_node.listener import BALANCE_DEFER_S, GuardedServer, SharedCounts
from kernel.settings import ListenerSettings


def _server(listening: socket.socket, counts, index: int) -> GuardedServer:
    ae = AE(ae_title="NODE")
    return GuardedServer(
        ae,
        listening.getsockname(),
        "NODE",
        list(StoragePresentationContexts),
        limits=ListenerSettings(),
        max_pdu_bytes=16384,
        shared=SharedCounts(counts, index),
        inherited=listening.dup(),
    )


def test_a_process_ahead_in_connections_leaves_the_next_one_to_the_other():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    counts = multiprocessing.Array("i", 4, lock=False)
    first, second = _server(listening, counts, 0), _server(listening, counts, 1)
    clients = []
    try:
        assert not first._ahead() and not second._ahead()  # 0 and 0

        first._negotiating = 1  # one connection being negotiated in the first
        counts[2] = 0  # the second published none
        assert first._ahead() and not second._ahead()

        counts[2] = 1  # the second has one too
        assert not first._ahead()

        # Ahead: the accept waits BALANCE_DEFER_S, then takes the connection itself
        # when nobody else did (the other process busy or gone).
        counts[2] = 0
        clients.append(socket.create_connection(listening.getsockname()))
        time.sleep(0.05)
        started = time.monotonic()
        request, _ = first.get_request()
        waited_s = time.monotonic() - started
        request.close()
        assert waited_s >= BALANCE_DEFER_S

        # Not ahead: it takes the connection (no wait for another).
        first._negotiating = 0
        assert not first._ahead()
        clients.append(socket.create_connection(listening.getsockname()))
        time.sleep(0.05)
        request, address = first.get_request()
        assert address[0] == "127.0.0.1"
        request.close()
    finally:
        for client in clients:
            client.close()
        for server in (first, second):
            server.socket.close()
        listening.close()
