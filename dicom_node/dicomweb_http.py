"""HTTP plumbing shared by DICOMweb destinations: the session (credentials, CA bundle),
HTTP answers and request errors in words, and the QIDO-RS health probe.

Conventions are those of DICOMweb sources (``dicom_node.source_dicomweb``): ``auth`` is
basic (RFC 7617) or bearer (RFC 6750) and lives in the ``requests`` session only, never
in a URL, page or log line; ``ca_bundle`` is the PEM file the server's certificate is
verified against (empty: the system's trust store). dicomweb-client logs request headers
(credentials included) at DEBUG, so its logger is held at WARNING.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from dicom_node.echo import EchoAnswer
from kernel.settings import Destination, DicomwebAuth

# Its DEBUG lines carry the Authorization header (basic or bearer credentials).
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

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


def check_dicomweb(dest: Destination, timeout_s: float = 5) -> EchoAnswer:
    """The DICOMweb counterpart of a C-ECHO: ``GET {url}/studies?limit=1`` (QIDO-RS,
    PS3.18 10.6) with the destination's credentials; ok when it answers 2xx.

    Never raises for network trouble: every failure is an answer with ``ok`` False
    (refused, timed out, TLS, HTTP 401 ...).
    """
    started = time.perf_counter()

    def answer(ok: bool, detail: str) -> EchoAnswer:
        return EchoAnswer(ok, detail, round((time.perf_counter() - started) * 1000, 1))

    url = dest.url or ""
    with session(dest.auth, dest.ca_bundle) as http:
        client = DICOMwebClient(url=url, session=http, timeout=(timeout_s, timeout_s))
        client.set_http_retry_params(retry=False)  # one request: the answer, now
        try:
            client.search_for_studies(limit=1)
        except requests.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else 0
            reason = response.reason if response is not None else None
            return answer(False, f"QIDO-RS {http_status_text(code, reason)}")
        except requests.RequestException as exc:
            return answer(False, request_error_text(exc, url, timeout_s))
        except ValueError as exc:  # an answer that is not DICOM JSON
            return answer(False, f"QIDO-RS answer from {url} is not DICOM JSON: {exc}")
    return answer(True, "success")
