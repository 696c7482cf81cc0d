"""The webhook sender: the node's loop that POSTs due job status notifications.

Rows come from ``kernel.webhooks`` (written when a job ends). The loop claims due rows
and hands each to one of ``webhooks.senders`` sender threads, at most ``MAX_PER_HOST``
at a time to one receiver (scheme, host, port), so a slow receiver holds its own
deliveries only, never another's. Each POST (``http.client``, no redirect followed) is
signed with the secret of ``webhooks.secret_file`` and has ``webhooks.timeout_s`` in all,
by the wall clock: connecting, sending and the whole answer. A watchdog shuts the socket
at the deadline, so a receiver trickling its answer a byte at a time cannot hold it
longer. Of the answer's body at most ``ANSWER_CAP_BYTES`` are read (the reason needs the
first 200 characters); the rest is never read.

Outcomes: 2xx delivered; 5xx, 408, 429, a refused connection or no complete answer
within the deadline retried with backoff; any other answer (a 4xx, a redirect) failed at
once with the reason, and so is a URL ``kernel.webhooks.check_url`` refuses now or whose
host resolves, at send time, to a loopback, link-local, unspecified, multicast or
metadata address not in ``webhooks.allowed_hosts`` (the addresses checked are the ones
connected to). Reasons name the URL's host only, never its path or query (which
may hold a token). A stop aborts the POSTs in flight and leaves their rows pending, no
attempt counted: they go again (a receiver may see one twice, never lose one).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from db.models import WebhookDelivery
from db.session import Database
from inference.results import product_version
from kernel import webhooks
from kernel.settings import WebhookSettings

log = logging.getLogger("dicom_node.webhooks")

ANSWER_CAP_BYTES = 64 << 10  # of an answer's body: more is never read (status + reason)
POLL_S = 0.5  # how often the loop looks for due rows when it found none
MAX_PER_HOST = 2  # POSTs in flight to one receiver (scheme, host, port) at a time
RETRY_STATUSES = frozenset({408, 429})  # 4xx answers that say "later", not "never"


class WebhookSetupError(ValueError):
    """The webhook secret cannot be used (unreadable or empty file)."""


def read_secret(settings: WebhookSettings) -> bytes | None:
    """The HMAC key of ``webhooks.secret_file`` (its text, whitespace stripped); None
    without a file. Raises ``WebhookSetupError`` for an unreadable or empty file."""
    if settings.secret_file is None:
        return None
    try:
        secret = settings.secret_file.read_bytes().strip()
    except OSError as exc:
        raise WebhookSetupError(
            f"webhooks.secret_file {settings.secret_file} cannot be read: {exc.strerror}"
        ) from None
    if not secret:
        raise WebhookSetupError(f"webhooks.secret_file {settings.secret_file} is empty")
    return secret


def _cause(exc: BaseException) -> str:
    """The innermost OS-level reason of a connection error, without the URL."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {current.verify_message}"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        todo += [current.__cause__, current.__context__]
    return type(exc).__name__


def classify(status: int, reason: str, head: bytes = b"") -> webhooks.Outcome:
    """An HTTP answer as an outcome (see the module docstring); ``head``: the first
    bytes of its body, whose first 200 characters go into the reason."""
    text = " ".join(head.decode("utf-8", "replace")[:200].split())
    detail = f"HTTP {status} {reason or ''}".rstrip() + (f": {text}" if text else "")
    if 200 <= status < 300:
        return webhooks.Outcome("delivered", status, f"HTTP {status}")
    if status >= 500 or status in RETRY_STATUSES:
        return webhooks.Outcome("retry", status, detail)
    if 300 <= status < 400:
        return webhooks.Outcome("failed", status, f"{detail} (redirects are not followed)")
    return webhooks.Outcome("failed", status, detail)


def read_head(response: http.client.HTTPResponse, cap_bytes: int = ANSWER_CAP_BYTES) -> bytes:
    """The answer's body up to its end or ``cap_bytes``, whichever comes first (a read
    may return less than asked: read on until either); raises ``IncompleteRead`` when
    the receiver closes before the body it announced."""
    head = bytearray()
    while len(head) < cap_bytes:
        part = response.read(cap_bytes - len(head))
        if not part:
            if response.length:  # http.client returns b"" for a body cut short
                raise http.client.IncompleteRead(bytes(head), response.length)
            break
        head += part
    return bytes(head)


class RefusedAddressError(Exception):
    """The URL's host resolves to an address the node does not POST to (SSRF)."""


class Watchdog:
    """The wall-clock deadline of one POST: at ``deadline_s`` (or on ``abort``) the
    socket in use is shut down, which ends any read or write blocked on it at once."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.expired = threading.Event()  # the deadline passed
        self.aborted = threading.Event()  # the node stops
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(timeout_s, self._fire, (self.expired,))
        self._timer.daemon = True
        self._timer.start()

    def remaining_s(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` at the deadline (at once when it already passed)."""
        with self._lock:
            self._sock = sock
            over = self.expired.is_set() or self.aborted.is_set()
        if over:
            self._shut(sock)

    def abort(self) -> None:
        self._fire(self.aborted)

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self, flag: threading.Event) -> None:
        with self._lock:
            flag.set()
            sock = self._sock
        if sock is not None:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # not connected yet, or closed: fails anyway
            sock.shutdown(socket.SHUT_RDWR)


class WebhookSender:
    """POSTs due deliveries until ``stop`` is set (``run_forever``); one per node.

    ``settings``: ``webhooks.*``. Raises ``WebhookSetupError`` when the secret file is
    unusable, so the node stops at start instead of sending unsigned.
    """

    def __init__(self, db: Database, settings: WebhookSettings) -> None:
        self.db = db
        self.settings = settings
        self.secret = read_secret(settings)
        self.name = f"{socket.gethostname()}/{os.getpid()}/webhooks"
        self.user_agent = f"dicom-node/{product_version()}"
        self.tls = ssl.create_default_context()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._in_flight: dict[int, tuple[str, Watchdog | None]] = {}  # row id -> host, POST

    # -- one POST ----------------------------------------------------------------------
    def post(
        self, row_id: int, url: str, body: str, watchdog: Watchdog | None = None
    ) -> webhooks.Outcome:
        """One POST of a delivery's body within ``webhooks.timeout_s`` in all; never
        raises for network trouble. ``watchdog``: the POST's deadline (a new one)."""
        timeout_s = self.settings.timeout_s
        dog = watchdog or Watchdog(timeout_s)
        data = body.encode("utf-8")
        headers = webhooks.signed_headers(self.secret, data, row_id)
        headers.update({"User-Agent": self.user_agent, "Connection": "close"})
        conn: http.client.HTTPConnection | None = None
        stage = "connection"
        try:
            webhooks.check_url(url, allowed_hosts=self.settings.allowed_hosts)
        except webhooks.WebhookUrlError as exc:  # a row older than the check, or a URL
            dog.cancel()  # from rules loaded before allowed_hosts changed
            return webhooks.Outcome("failed", None, str(exc))
        try:
            parts = urlsplit(url)
            conn = self._connect(parts.scheme.lower(), parts.hostname or "", parts.port, dog)
            stage = "answer"
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=data, headers=headers)
            response = conn.getresponse()
            head = read_head(response)
            if dog.expired.is_set() or dog.aborted.is_set():
                raise TimeoutError  # the socket was shut under the last read
            return classify(response.status, response.reason, head)
        except RefusedAddressError as exc:
            return webhooks.Outcome("failed", None, f"update_url refused: {exc}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if dog.aborted.is_set():
                return webhooks.Outcome("retry", None, "interrupted by the node's stop")
            if dog.expired.is_set() or isinstance(exc, TimeoutError):
                return webhooks.Outcome("retry", None, f"no complete answer within {timeout_s:g} s")
            if stage == "connection":
                return webhooks.Outcome("retry", None, f"no connection: {_cause(exc)}")
            return webhooks.Outcome("retry", None, f"no complete answer: {_cause(exc)}")
        finally:
            dog.cancel()
            if conn is not None:
                conn.close()  # the unread rest of a long answer goes with the connection

    def _connect(
        self, scheme: str, host: str, port: int | None, dog: Watchdog
    ) -> http.client.HTTPConnection:
        """A connection to ``host``, its socket watched by ``dog`` from before the TCP
        connect to the end (a TLS handshake included)."""
        https = scheme == "https"
        port = port or (443 if https else 80)
        last: OSError | None = None
        sock: socket.socket | None = None
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # What the name resolves to now is what is checked and connected to (no second
        # lookup a rebinding DNS server could answer otherwise).
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]
        refused = webhooks.host_refusal(host, addresses, self.settings.allowed_hosts)
        if refused is not None:
            raise RefusedAddressError(refused)
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            dog.watch(sock)
            try:
                sock.settimeout(dog.remaining_s())
                sock.connect(address)
                break
            except OSError as exc:
                sock.close()
                sock, last = None, exc
                if dog.expired.is_set() or dog.aborted.is_set():
                    break
        if sock is None:
            raise last or OSError("no address")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: http.client.HTTPConnection
        if https:
            sock = self.tls.wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, context=self.tls)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn.sock = sock  # connected and watched: request() sends on it
        return conn

    # -- the loop ------------------------------------------------------------------------
    def _take(self, busy: Counter[str]) -> Callable[[str], bool]:
        """A ``claim_due`` chooser: a row is taken while its receiver has fewer than
        ``MAX_PER_HOST`` POSTs in flight (``busy`` counts them, taken rows included)."""

        def take(url: str) -> bool:
            host = webhooks.display_url(url)
            if busy[host] >= MAX_PER_HOST:
                return False
            busy[host] += 1
            return True

        return take

    def send_due(self, pool: ThreadPoolExecutor) -> int:
        """Claim due rows for the free sender threads and start their POSTs; returns how
        many were claimed."""
        with self._lock:
            free = self.settings.senders - len(self._in_flight)
            busy = Counter(host for host, _ in self._in_flight.values())
        if free <= 0:
            return 0
        rows = webhooks.claim_due(self.db, free, self.name, take=self._take(busy))
        for row in rows:
            with self._lock:
                self._in_flight[row.id] = (webhooks.display_url(row.url), None)
            pool.submit(self._deliver, row)
        return len(rows)

    def _deliver(self, row: WebhookDelivery) -> None:
        dog = Watchdog(self.settings.timeout_s)
        with self._lock:
            self._in_flight[row.id] = (self._in_flight[row.id][0], dog)
            if self._stopping:
                dog.abort()
        try:
            outcome = self.post(row.id, row.url, row.body, dog)
            if dog.aborted.is_set():
                webhooks.release_unsent(self.db, [row.id])
                return
            state = webhooks.record(self.db, row.id, outcome, self.settings)
            log.info(
                "webhook %d (job %d) to %s: %s -> %s",
                row.id,
                row.job_id,
                webhooks.display_url(row.url),
                outcome.detail,
                state,
            )
        except Exception:
            log.exception("webhook %d: sender error", row.id)
        finally:
            with self._lock:
                del self._in_flight[row.id]
            self.wake.set()  # a sender thread is free

    def run_forever(self, stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(self.settings.senders, thread_name_prefix="webhook-post")
        try:
            while not stop.is_set():
                try:
                    if self.send_due(pool):
                        continue
                except Exception:
                    log.exception("webhook sender error")
                self.wake.wait(POLL_S)
                self.wake.clear()
        finally:
            with self._lock:
                self._stopping = True
                dogs = [dog for _, dog in self._in_flight.values() if dog is not None]
            for dog in dogs:
                dog.abort()
            pool.shutdown(wait=True)
