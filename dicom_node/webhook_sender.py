"""The webhook sender: one loop in the node that POSTs due job status notifications.

Rows come from ``kernel.webhooks`` (written when a job ends); each is claimed, POSTed
with ``requests`` (no redirect followed, ``webhooks.timeout_s``), signed with the secret
of ``webhooks.secret_file``, and its answer recorded: 2xx delivered; 5xx, 408, 429, a
refused connection or a timeout retried with backoff; any other answer (a 4xx, a
redirect) failed at once with the reason. Reasons name the URL's host only, never its
path or query (which may hold a token).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import requests
import urllib3

from db.session import Database
from inference.results import product_version
from kernel import webhooks
from kernel.settings import WebhookSettings

log = logging.getLogger("dicom_node.webhooks")

ANSWER_CAP_BYTES = 64 << 10  # of an answer's body: more is never read (status + reason)
POLL_S = 0.5  # how often the loop looks for due rows when it found none
BATCH = 8  # rows claimed at a time
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
    """The innermost OS-level reason of a requests exception, without the URL (which
    requests' own messages repeat, query string included)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None)]
        todo += [a for a in current.args if isinstance(a, BaseException)]
    return type(exc).__name__


def read_capped(response: requests.Response, cap_bytes: int = ANSWER_CAP_BYTES) -> bytes:
    """At most ``cap_bytes`` of a streamed answer's body; the rest is never read (the
    connection is closed with the response), so a huge answer costs no memory."""
    return response.raw.read(cap_bytes, decode_content=True) or b""


def classify(response: requests.Response, head: bytes = b"") -> webhooks.Outcome:
    """An HTTP answer as an outcome (see the module docstring); ``head``: the first
    bytes of its body (``read_capped``), whose first 200 characters go into the reason."""
    code = response.status_code
    text = " ".join(head.decode("utf-8", "replace")[:200].split())
    detail = f"HTTP {code} {response.reason or ''}".rstrip() + (f": {text}" if text else "")
    if 200 <= code < 300:
        return webhooks.Outcome("delivered", code, f"HTTP {code}")
    if code >= 500 or code in RETRY_STATUSES:
        return webhooks.Outcome("retry", code, detail)
    if 300 <= code < 400:
        return webhooks.Outcome("failed", code, f"{detail} (redirects are not followed)")
    return webhooks.Outcome("failed", code, detail)


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
        self.http = requests.Session()
        self.http.headers["User-Agent"] = f"dicom-node/{product_version()}"
        self.wake = threading.Event()

    def post(self, row_id: int, url: str, body: str) -> webhooks.Outcome:
        """One POST of a delivery's body; never raises for network trouble."""
        data = body.encode("utf-8")
        headers = webhooks.signed_headers(self.secret, data, row_id)
        try:
            response = self.http.post(
                url,
                data=data,
                headers=headers,
                timeout=self.settings.timeout_s,
                allow_redirects=False,
                stream=True,  # the body is read capped (read_capped), never whole
            )
        except requests.Timeout:
            return webhooks.Outcome(
                "retry", None, f"no answer within {self.settings.timeout_s:g} s"
            )
        except requests.RequestException as exc:
            return webhooks.Outcome("retry", None, f"no connection: {_cause(exc)}")
        with response:
            try:
                head = read_capped(response)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                return webhooks.Outcome("retry", None, f"no complete answer: {_cause(exc)}")
            return classify(response, head)

    def send_due(self, stop: threading.Event) -> int:
        """Claim and POST one batch of due rows; returns how many were claimed."""
        rows = webhooks.claim_due(self.db, BATCH, self.name)
        for i, row in enumerate(rows):
            if stop.is_set():
                webhooks.release_unsent(self.db, [r.id for r in rows[i:]])
                break
            outcome = self.post(row.id, row.url, row.body)
            state = webhooks.record(self.db, row.id, outcome, self.settings)
            log.info(
                "webhook %d (job %d) to %s: %s -> %s",
                row.id,
                row.job_id,
                webhooks.display_url(row.url),
                outcome.detail,
                state,
            )
        return len(rows)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.send_due(stop):
                    continue
            except Exception:
                log.exception("webhook sender error")
            self.wake.wait(POLL_S)
            self.wake.clear()
        self.http.close()
