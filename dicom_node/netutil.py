"""Small network helpers shared by the CLI, the tests and the benchmarks.

Free ports, waiting for a listener to come up, and a one-shot C-ECHO. Nothing here keeps
state; every function opens and closes its own socket or association.
"""

from __future__ import annotations

import socket
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

# Poll interval while waiting for a listener: short enough that a test does not wait
# noticeably longer than the server needs, long enough not to spin a shared CPU.
_POLL_INTERVAL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, read it back).

    The port is released before returning, so another process could take it in between;
    callers that start a server on it should retry or fail clearly if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises ``TimeoutError`` naming the address and how long it waited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if port_is_open(host, port, timeout_s=min(0.5, max(timeout_s, 0.01))):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"nothing accepted TCP connections on {host}:{port} within {timeout_s:g} s; "
                "check that the server started and listens on that address"
            )
        time.sleep(_POLL_INTERVAL_S)


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    timeout_s: float = 5,
) -> bool:
    """Send one C-ECHO to ``called_ae`` at ``host:port``; True when it answers Success.

    False covers every failure (refused connection, rejected association, non-success
    status, timeout), because callers use this as a yes/no reachability check.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and getattr(status, "Status", None) == 0x0000
    finally:
        assoc.release()
