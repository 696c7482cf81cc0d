"""HTTP plumbing shared by DICOMweb destinations: the session (credentials, CA bundle),
HTTP answers and request errors in words, answers read with a size cap, and the QIDO-RS
health probe.

Conventions are those of DICOMweb sources (``dicom_node.source_dicomweb``): ``auth`` is
basic (RFC 7617) or bearer (RFC 6750) and lives in the ``requests`` session only, never
in a URL, page or log line; ``ca_bundle`` is the PEM file the server's certificate is
verified against (empty: the system's trust store).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from dicom_node.echo import EchoAnswer
from kernel.settings import Destination, DicomwebAuth

# How a QIDO-RS check's detail begins when the server answered but not with success.
CHECK_ANSWERED = "QIDO-RS check"
# At most this much of a QIDO-RS health check's answer is read (one study: a few KiB).
QIDO_MAX_BYTES = 1 << 20
# Bytes asked of the socket per read of an answer.
READ_BLOCK_BYTES = 64 << 10

# What an HTTP error status means for a DICOMweb client (PS3.18 8.7.4 and 10.5.3).
HTTP_MEANING = {
    400: "bad request (the server could not read the request)",
    401: "credentials missing or refused (auth)",
    403: "access denied to these credentials (auth)",
    404: "not found (is url the DICOMweb root, the part before /studies?)",
    406: "the server cannot answer in DICOM JSON",
    408: "the server timed out waiting for the request",
    413: "request too large for the server",
    415: "the server does not take application/dicom",
    429: "too many requests",
    503: "service unavailable (busy)",
}


def session(auth: DicomwebAuth | None, ca_bundle: Path | None) -> requests.Session:
    """A requests session that presents ``auth`` and trusts ``ca_bundle``."""
    out = requests.Session()
    if auth is not None and auth.type == "basic":
        out.auth = (auth.username or "", auth.password.get_secret_value() if auth.password else "")
    elif auth is not None and auth.type == "bearer" and auth.token is not None:
        out.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    out.verify = str(ca_bundle) if ca_bundle else True
    return out


def http_status_text(code: int, reason: str | None = None) -> str:
    """``HTTP 401 Unauthorized: credentials missing or refused (auth)``."""
    meaning = HTTP_MEANING.get(code)
    text = f"HTTP {code}" + (f" {reason}" if reason else "")
    return f"{text}: {meaning}" if meaning else text


_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")]*|certificate verify failed[^'\")]*")


def request_error_text(exc: requests.RequestException, url: str, timeout_s: float) -> str:
    """A failed request (no HTTP answer) in a short line naming ``url``: refused,
    unresolvable, TLS failure, timed out."""
    if isinstance(exc, requests.Timeout):
        return f"no answer from {url} within {timeout_s:g} s (timed out)"
    found = _ERRNO.search(str(exc))
    why = found.group(0).strip() if found else str(exc)[:200]
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS with {url} failed: {why}"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {url}: {why}"
    return f"request to {url} failed: {why}"


class AnswerUnread(Exception):
    """An HTTP answer's body was not read whole: larger than the cap, not complete in
    time, or broken off. The message says which ("the answer is too large (more than
    16 MiB)")."""


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:g} MiB"


def read_capped(response: requests.Response, max_bytes: int, within_s: float) -> bytes:
    """The body of ``response`` (sent with ``stream=True``), at most ``max_bytes`` of it,
    in ``READ_BLOCK_BYTES`` reads that return what has arrived (so a trickle is bounded
    by ``within_s`` too, not only by each read's socket timeout). Content-Encoding is
    decoded and the cap counts decoded bytes.

    Raises ``AnswerUnread`` when a Content-Length above the cap is announced (nothing is
    read), more than ``max_bytes`` arrive, the body is not complete within ``within_s``
    seconds, or the connection breaks. Memory: at most ``max_bytes + READ_BLOCK_BYTES``.
    """
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise AnswerUnread(
            f"the answer is too large ({_mib(int(declared))} announced, at most "
            f"{_mib(max_bytes)} is read)"
        )
    deadline = time.monotonic() + within_s
    body = bytearray()
    try:
        while block := response.raw.read1(READ_BLOCK_BYTES, decode_content=True):
            body += block
            if len(body) > max_bytes:
                raise AnswerUnread(f"the answer is too large (more than {_mib(max_bytes)})")
            if time.monotonic() > deadline:
                raise AnswerUnread(f"the answer was not complete within {within_s:g} s")
    except urllib3.exceptions.ReadTimeoutError:
        raise AnswerUnread(f"the answer was not complete within {within_s:g} s") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise AnswerUnread(f"the answer broke off: {str(exc)[:200]}") from None
    return bytes(body)


def check_dicomweb(dest: Destination, timeout_s: float = 5) -> EchoAnswer:
    """The DICOMweb counterpart of a C-ECHO: ``GET {url}/studies?limit=1`` (QIDO-RS,
    PS3.18 10.6) with the destination's credentials; ok when it answers 200 with a DICOM
    JSON array (or 204, no studies).

    One plain GET with the destination's session, redirects not followed (a 302 is
    reported as such, naming where it points, as STOW-RS sends do not follow it either);
    the answer is read with a cap of ``QIDO_MAX_BYTES`` (a one-study answer is a few KiB)
    and within ``timeout_s``, so a peer answering hundreds of MiB cannot fill the node's
    memory.

    Never raises for network trouble: every failure is an answer with ``ok`` False.
    Without an HTTP answer the detail says why (refused connection, timed out, TLS);
    with one it begins ``CHECK_ANSWERED`` and says what came ("QIDO-RS check refused:
    HTTP 401 Unauthorized: ...", "QIDO-RS check redirected: HTTP 302 Found to ...",
    "QIDO-RS check failed: HTTP 200 but the answer is not DICOM JSON (text/html)").
    """
    started = time.perf_counter()

    def answer(ok: bool, detail: str) -> EchoAnswer:
        return EchoAnswer(ok, detail, round((time.perf_counter() - started) * 1000, 1))

    url = f"{dest.url or ''}/studies"
    with session(dest.auth, dest.ca_bundle) as http:
        try:
            with http.get(
                url,
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                timeout=(timeout_s, timeout_s),
                allow_redirects=False,  # as STOW-RS: a redirect is reported, not followed
                stream=True,
            ) as response:
                code, reason = response.status_code, response.reason
                status = http_status_text(code, reason)
                if 300 <= code < 400:
                    where = _location(response)
                    return answer(
                        False,
                        f"{CHECK_ANSWERED} redirected: {status}{where} "
                        "(set url to the address it names)",
                    )
                if 400 <= code < 500:
                    return answer(False, f"{CHECK_ANSWERED} refused: {status}")
                if code not in (200, 204):
                    return answer(False, f"{CHECK_ANSWERED} failed: {status}")
                body = read_capped(response, QIDO_MAX_BYTES, timeout_s)
                content_type = response.headers.get("Content-Type") or "no Content-Type"
        except AnswerUnread as exc:
            return answer(False, f"{CHECK_ANSWERED} failed: HTTP {code} but {exc}")
        except requests.RequestException as exc:
            return answer(False, request_error_text(exc, url, timeout_s))
    if code == 200 and not _is_json_array(body):
        kind = content_type.split(";", 1)[0].strip()
        return answer(
            False, f"{CHECK_ANSWERED} failed: HTTP 200 but the answer is not DICOM JSON ({kind})"
        )
    return answer(True, "success")


def check_answered(detail: str) -> bool:
    """Whether a QIDO-RS check's ``detail`` (``check_dicomweb``) reports an HTTP answer
    that was not a success (refused, redirected, unreadable), rather than none."""
    return detail.startswith(CHECK_ANSWERED)


def _location(response: requests.Response) -> str:
    """`` to <Location>`` of a redirect, without any user name or password in it."""
    location = response.headers.get("Location")
    if not location:
        return ""
    parts = urlsplit(location)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname or "")
    return f" to {urlunsplit(parts)}"


def _is_json_array(body: bytes) -> bool:
    """Whether ``body`` is a JSON array (a QIDO-RS answer, PS3.18 F.2); an empty body
    (no studies) counts as one."""
    if not body.strip():
        return True
    try:
        return isinstance(json.loads(body), list)
    except (ValueError, UnicodeDecodeError):
        return False
