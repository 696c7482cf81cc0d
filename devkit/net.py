"""Network helpers of the tests, the demo and the benchmarks: free ports, waiting for a
listener to come up. Nothing here keeps state; every function opens and closes its own
socket.
"""

from __future__ import annotations

import socket
import time

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
