"""DICOM TLS (PS3.15 B.1, the TLS Secure Transport Connection Profile) for the listener
and the destinations: SSL contexts, the verified peer's certificate subject, and TLS
failures in words.

Policy, both directions: TLS 1.2 or later (``min_version``), TLS 1.2 cipher suites with
forward secrecy and AEAD only (``MODERN_TLS12_CIPHERS``; TLS 1.3 suites are all AEAD),
no compression, no renegotiation. The listener always verifies a client certificate it
receives (``client_certificate``: ``required`` refuses a peer without one in the
handshake); the node as TLS client always verifies the destination's certificate against
its ``ca_bundle`` (or the system store) and, unless ``verify_hostname`` is off, that the
certificate names the destination's host.

pynetdicom 3.0.4 takes these contexts as they are (``ssl_context`` of a server,
``tls_args`` of ``AE.associate``) but, as a client, logs a failed handshake and drops the
exception; ``ClientContext`` keeps it so the dispatcher and C-ECHO can say what went
wrong (``explain``), e.g. "the destination's certificate has expired".
"""

from __future__ import annotations

import ssl
from pathlib import Path

from kernel.settings import SUBJECT_ATTRIBUTES, ConfigError, DestinationTls, ListenerTls

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SHORT_NAMES = {long: short for short, long in SUBJECT_ATTRIBUTES.items()}

# OpenSSL reasons (``SSLError.reason``) in words; the raw reason is always added.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "a client certificate is required and none was sent",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was sent",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate: it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer refused our certificate: it is revoked",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed the certificate "
    "it was shown",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused the certificate it was shown",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused the certificate it was shown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer refused the certificate it was shown",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS here (plain DICOM on a TLS port, "
    "or TLS to a plain port)",
    "HTTP_REQUEST": "the peer sent an HTTP request, not a TLS handshake",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (TLS 1.2 or later is required)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (TLS 1.2 or later is required)",
    "NO_SHARED_CIPHER": "no cipher suite in common",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer ended the handshake (no cipher suite or "
    "version in common, or it refused the certificate)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the TLS handshake "
    "(does it serve DICOM TLS on this port?)",
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
}


class TlsSetupError(ConfigError):
    """A TLS certificate, key or CA file cannot be used; the message names the settings
    key and the file (``dicom-node serve`` stops with it, as for any invalid setting)."""


def _base_context(purpose: ssl.Purpose, min_version: str, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{what}: cannot use certificate {cert} with key {key}: "
                            f"{explain(exc)}") from exc  # fmt: skip


def _load_cas(ctx: ssl.SSLContext, bundle: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"{what}: cannot read CA bundle {bundle}: {explain(exc)}") from exc


def server_context(cfg: ListenerTls) -> ssl.SSLContext:
    """The listener's context (``tls`` settings). Raises TlsSetupError."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, cfg.min_version, cfg.ciphers)
    assert cfg.certificate is not None and cfg.private_key is not None  # settings check
    _load_chain(ctx, cfg.certificate, cfg.private_key, "tls")
    if cfg.ca_bundle is not None:
        _load_cas(ctx, cfg.ca_bundle, "tls")
    ctx.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[cfg.client_certificate]
    return ctx


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that leaves its first TLS failure on its context (see ClientContext)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._record(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # e.g. TLS 1.3: the server's verdict on our certificate
            self._record(exc)
            raise

    def _record(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = exc


class ClientContext(ssl.SSLContext):
    """A client context that keeps the first TLS failure of its connection in
    ``failure``; make one per association (``client_context``)."""

    sslsocket_class = _RecordingSocket
    failure: OSError | None = None


def client_context(cfg: DestinationTls, what: str = "destination") -> ClientContext:
    """A fresh context for one association to a destination (files are read each time,
    so renewed certificates take effect at the next association). Raises TlsSetupError."""
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.set_ciphers(cfg.ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = cfg.verify_hostname
    if cfg.ca_bundle is not None:
        _load_cas(ctx, cfg.ca_bundle, what)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.certificate is not None and cfg.private_key is not None:
        _load_chain(ctx, cfg.certificate, cfg.private_key, what)
    return ctx


def peer_subject(sock: object) -> tuple[tuple[str, str], ...] | None:
    """The subject of the client certificate ``sock`` (an SSLSocket) verified, as
    (RFC 4514 short name, value) pairs; None for a plain socket or no verified
    certificate (``getpeercert()`` is empty unless the certificate was verified)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    return tuple(
        (_SHORT_NAMES.get(name, name), value)
        for rdn in cert.get("subject", ())
        for name, value in rdn
    )


def format_subject(subject: tuple[tuple[str, str], ...] | None) -> str:
    """``(('CN', 'CT1'), ('O', 'X'))`` -> ``'CN=CT1, O=X'``; None -> ``'no certificate'``."""
    if subject is None:
        return "no certificate"
    return ", ".join(f"{name}={value.replace(',', chr(92) + ',')}" for name, value in subject)


def explain(exc: BaseException) -> str:
    """A TLS failure in words, with OpenSSL's own reason in brackets."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        hint = ""
        if exc.verify_code in (2, 19, 20, 21):  # issuer unknown, self-signed in chain
            hint = " (not signed by a CA in the trusted bundle)"
        return f"certificate verify failed: {message}{hint}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        words = _REASONS.get(reason)
        raw = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        raw = raw.split(" (_ssl.c")[0]
        return f"{words} ({raw})" if words else raw
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return (
            "the peer reset the connection during the TLS handshake (does it serve DICOM TLS "
            "on this port?)"
        )
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def client_tls_args(
    cfg: DestinationTls | None, host: str, what: str
) -> tuple[ClientContext, str] | None:
    """``tls_args`` for ``AE.associate`` to a destination (None: plain DICOM): a fresh
    ``ClientContext`` and the name its certificate must carry. Raises TlsSetupError."""
    if cfg is None:
        return None
    return client_context(cfg, what), cfg.server_name or host


def association_failure(
    tls_args: tuple[ClientContext, str] | None, host: str, port: int
) -> str | None:
    """Why the TLS connection made with ``tls_args`` failed, in words naming the peer
    (None: plain DICOM, or TLS did not fail)."""
    if tls_args is None or tls_args[0].failure is None:
        return None
    return f"TLS with {host}:{port} failed: {explain(tls_args[0].failure)}"
