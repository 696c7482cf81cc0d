"""A one-shot C-ECHO (Verification SOP Class, PS3.4 annex A): is a DICOM peer there?"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from dicom_node import tls as dicom_tls
from kernel.settings import DestinationTls


@dataclass(frozen=True)
class EchoAnswer:
    """What one C-ECHO came to: ``ok`` and, when not, why (refused, rejected, timed out,
    a non-success status); ``round_trip_ms`` from association request to release."""

    ok: bool
    detail: str
    round_trip_ms: float


def check(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    timeout_s: float = 5,
    tls: DestinationTls | None = None,
) -> EchoAnswer:
    """Send one C-ECHO to ``called_ae`` at ``host:port`` and say what happened; over
    DICOM TLS when ``tls`` is given (a failed handshake is answered with its reason).

    Never raises for network trouble: every failure is an answer with ``ok`` False.
    """
    started = time.perf_counter()

    def answer(ok: bool, detail: str) -> EchoAnswer:
        return EchoAnswer(ok, detail, round((time.perf_counter() - started) * 1000, 1))

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    tls_args = None
    try:
        tls_args = dicom_tls.client_tls_args(tls, host, f"C-ECHO to {called_ae}")
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    except Exception as exc:  # socket errors surface here on some platforms
        return answer(False, f"no association: {exc}")
    failure = dicom_tls.association_failure(tls_args, host, port)
    if failure is not None and not assoc.is_established:
        return answer(False, failure)
    if assoc.is_rejected:
        return answer(False, f"association rejected by {called_ae}")
    if not assoc.is_established:
        return answer(
            False,
            f"no association with {called_ae} at {host}:{port} (refused, aborted or timed out)",
        )
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None) if status else None
        if code == Status.SUCCESS:
            return answer(True, "success")
        if code is None:
            return answer(False, "no C-ECHO response (timed out or aborted)")
        return answer(False, f"C-ECHO status 0x{int(code):04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    timeout_s: float = 5,
    tls: DestinationTls | None = None,
) -> bool:
    """Send one C-ECHO to ``called_ae`` at ``host:port``; True when it answers Success.

    False covers every failure (refused connection, rejected association, non-success
    status, timeout), because callers use this as a yes/no reachability check.
    """
    return check(host, port, called_ae, calling_ae, timeout_s, tls).ok
