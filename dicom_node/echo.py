"""A one-shot C-ECHO (Verification SOP Class, PS3.4 annex A): is a DICOM peer there?"""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status


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
        return bool(status) and getattr(status, "Status", None) == Status.SUCCESS
    finally:
        assoc.release()
