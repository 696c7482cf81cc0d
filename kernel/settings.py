"""Node settings: one YAML file, overridable by ``DICOM_NODE_<KEY>`` environment variables.

Precedence (highest first): environment variables, the settings file, the defaults below.
Nested keys are joined by ``__`` (``DICOM_NODE_WEB__PORT=8080``); lists and objects are
given as JSON (``DICOM_NODE_PEERS='[{"ae_title": "*", "host": "10.0.0.5"}]'``).
"""

from __future__ import annotations

import ipaddress
import os
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kernel.strict import StrictModel
from kernel.vocabulary import ResultType

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "DICOM_NODE_"


class ConfigError(Exception):
    """The settings are invalid; the message names each key and its problem."""


def _check_ae_title(value: str) -> str:
    text = value.strip()
    if not text or len(text) > 16 or "\\" in text or not text.isprintable():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without '\\'")
    return text


# RFC 4514 short names of the subject attributes a peers entry may name, and the long
# names Python's ssl module reports them with (``SSLSocket.getpeercert()``).
SUBJECT_ATTRIBUTES = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "ST": "stateOrProvinceName",
    "L": "localityName",
    "DC": "domainComponent",
    "serialNumber": "serialNumber",
    "emailAddress": "emailAddress",
}
_SUBJECT_KEYS = {k.lower(): k for k in SUBJECT_ATTRIBUTES}


def parse_subject(text: str) -> tuple[tuple[str, str], ...]:
    """``'CN=CT1, O=Hospital'`` -> ``(('CN', 'CT1'), ('O', 'Hospital'))``.

    Attribute names are case-insensitive (RFC 4514 section 2.3), values are compared
    exactly; a comma inside a value is written ``\\,``. Raises ValueError naming an
    unknown attribute or a part without ``=``.
    """
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    pairs = []
    for part in parts:
        name, sep, value = part.partition("=")
        key = _SUBJECT_KEYS.get(name.strip().lower())
        if not sep or not value.strip():
            raise ValueError(f"certificate subject part {part.strip()!r} is not NAME=value")
        if key is None:
            raise ValueError(
                f"certificate subject attribute {name.strip()!r} is not one of "
                f"{', '.join(SUBJECT_ATTRIBUTES)}"
            )
        pairs.append((key, value.strip()))
    return tuple(pairs)


class Peer(StrictModel):
    """A remote AE allowed to associate with this node (default deny)."""

    ae_title: str = Field(description="Calling AE title, or '*' for any AE title from host.")
    host: str = Field(description="Source IP address or network (CIDR) the peer connects from.")
    port: int | None = Field(None, ge=1, le=65535, description="The peer's own SCP port.")
    require_tls: bool = Field(
        False,
        description="Admit this peer only over DICOM TLS (the `tls` listener), with or "
        "without a client certificate.",
    )
    certificate_subject: str | None = Field(
        None,
        description="Admit this peer only over DICOM TLS with a client certificate that "
        "the node verified (tls.client_certificate optional or required) and whose "
        "subject has every attribute listed here, e.g. 'CN=CT1, O=Hospital' (RFC 4514 "
        "names: CN, O, OU, C, ST, L, DC, serialNumber, emailAddress; ',' inside a value "
        "written '\\,').",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v.strip() if v.strip() == "*" else _check_ae_title(v)

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parse_subject(v)  # raises ValueError naming the bad attribute
        return v.strip()

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        ipaddress.ip_network(v.strip(), strict=False)  # raises ValueError on a bad address
        return v.strip()

    def allows(
        self,
        calling_ae: str,
        address: str,
        over_tls: bool = False,
        subject: tuple[tuple[str, str], ...] | None = None,
    ) -> bool:
        """Whether this entry admits ``calling_ae`` from ``address``; ``over_tls``: the
        association came over DICOM TLS, ``subject``: the verified client certificate's
        subject as (short name, value) pairs (None: no verified certificate)."""
        if not self.allows_title_and_address(calling_ae, address):
            return False
        if (self.require_tls or self.certificate_subject) and not over_tls:
            return False
        if self.certificate_subject:
            return subject is not None and set(parse_subject(self.certificate_subject)) <= set(
                subject
            )
        return True

    def allows_title_and_address(self, calling_ae: str, address: str) -> bool:
        """The AE title and address part of ``allows`` (no TLS requirement)."""
        if self.ae_title != "*" and self.ae_title != calling_ae.strip():
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


TlsVersion = Literal["1.2", "1.3"]
# TLS 1.2 suites: forward secrecy and AEAD only (the BCP 195 / RFC 9325 set DCMTK's default
# profile also offers); TLS 1.3 suites are all AEAD and left at OpenSSL's defaults.
MODERN_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _existing_file(v: Path | None) -> Path | None:
    if v is not None and not Path(v).is_file():
        raise ValueError(f"file {v} does not exist")
    return v


class DestinationTls(StrictModel):
    """DICOM TLS to one destination (PS3.15 B.1, the TLS Secure Transport Connection
    Profile): the destination's certificate is verified against ``ca_bundle``; the node
    presents ``certificate`` when the destination asks for one (mutual TLS)."""

    ca_bundle: Path | None = Field(
        None,
        description="PEM file of the CAs (or self-signed certificates) trusted to sign the "
        "destination's certificate; empty: the system's trust store.",
    )
    certificate: Path | None = Field(
        None,
        description="PEM certificate (chain) the node presents as TLS client; empty: none "
        "(destinations that require one refuse the node).",
    )
    private_key: Path | None = Field(None, description="PEM private key of `certificate`.")
    server_name: str | None = Field(
        None,
        description="Name (DNS or IP) the destination's certificate must carry in "
        "subjectAltName; empty: its `host`.",
    )
    verify_hostname: bool = Field(
        True,
        description="false: accept any certificate the CA signed, whatever name it carries "
        "(for PACS certificates issued without the PACS's address).",
    )
    min_version: TlsVersion = Field("1.2", description="Lowest TLS version offered.")
    ciphers: str = Field(
        MODERN_TLS12_CIPHERS, description="OpenSSL cipher list for TLS 1.2 connections."
    )

    _files = field_validator("ca_bundle", "certificate", "private_key")(
        classmethod(lambda cls, v: _existing_file(v))
    )

    @model_validator(mode="after")
    def _key_with_certificate(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class DicomwebAuth(StrictModel):
    """How the node authenticates to a DICOMweb source or destination."""

    type: Literal["basic", "bearer"] = Field(
        description="'basic' (username, password; RFC 7617) or 'bearer' (token; RFC 6750)."
    )
    username: str | None = None
    password: SecretStr | None = Field(None, description="basic: never shown or logged.")
    token: SecretStr | None = Field(None, description="bearer: never shown or logged.")

    @model_validator(mode="after")
    def _complete(self) -> DicomwebAuth:
        if self.type == "basic" and (self.username is None or self.password is None):
            raise ValueError("basic auth needs username and password")
        if self.type == "bearer" and self.token is None:
            raise ValueError("bearer auth needs token")
        return self


class Destination(StrictModel):
    """Where results (and forwarded originals) are sent: a DICOM AE by C-STORE (``kind:
    dimse``, the default: ``ae_title``, ``host``, ``port``) or a DICOMweb server by STOW-RS
    (``kind: dicomweb``: ``url``, ``auth``, ``ca_bundle``; PS3.18 10.5)."""

    kind: Literal["dimse", "dicomweb"] = Field(
        "dimse",
        description="'dimse': C-STORE to ae_title at host:port; 'dicomweb': STOW-RS to url.",
    )
    name: str = Field(description="Name used by routing rules and the status page.")
    ae_title: str | None = Field(None, description="dimse: the destination's AE title.")
    host: str | None = Field(None, description="dimse: host name or address.")
    port: int | None = Field(None, ge=1, le=65535, description="dimse: its DICOM port.")
    url: str | None = Field(
        None,
        description="dicomweb: base URL of the DICOMweb service (the part before /studies), "
        "e.g. https://pacs.example/dicom-web; credentials go in `auth`, not in the URL.",
    )
    auth: DicomwebAuth | None = Field(
        None, description="dicomweb: credentials (basic or bearer); empty: none."
    )
    ca_bundle: Path | None = Field(
        None,
        description="dicomweb over https: PEM file of the CAs trusted to sign the server's "
        "certificate (empty: the system's trust store).",
    )
    calling_ae_title: str | None = Field(
        None, description="AE title we present to this destination (default: our ae_title)."
    )
    result_type: ResultType = Field(
        ResultType.BINARY,
        description="What this destination gets for a result: a BINARY DICOM-SEG (every "
        "viewer), a LABELMAP SEG (Label Map Segmentation, RLE; smaller, needs a recent "
        "viewer) or an RTSTRUCT (contours, for systems that cannot show SEG).",
    )
    storage_commitment: bool = Field(
        False,
        description="Ask this destination to commit what it received (Storage Commitment "
        "Push Model); its report turns rows from 'sent' into 'committed'. The destination "
        "must also be in `peers`: it reports back on a new association.",
    )
    empty_result: Literal["skip", "send"] = Field(
        "skip",
        description="When a pipeline finds no label: 'skip' sends nothing (the job and event "
        "log say so), 'send' sends a SEG whose segments are all empty, so the reader sees "
        "that the series was analysed.",
    )
    review: Literal["none", "required"] = Field(
        "none",
        description="'required': results for this destination are held until a user with "
        "the reviewer (or admin) role approves them in the result viewer (sent at once) or "
        "rejects them with a reason (never sent). For introducing a new model in shadow "
        "mode; a pipeline can ask for review too (rules file, `review`).",
    )

    max_associations: int = Field(
        2,
        ge=1,
        le=16,
        description="Associations (dicomweb: STOW-RS requests) the node has open to this "
        "destination at once (each sends its own share of the due rows); every destination "
        "has its own senders, so a slow or dead one never delays another.",
    )
    tls: DestinationTls | None = Field(
        None,
        description="DICOM TLS for this destination (sends, storage commitment requests "
        "and C-ECHOs); empty: plain DICOM.",
    )

    _ae = field_validator("ae_title", "calling_ae_title")(
        classmethod(lambda cls, v: v if v is None else _check_ae_title(v))
    )
    _files = field_validator("ca_bundle")(classmethod(lambda cls, v: _existing_file(v)))

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {v!r} must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials: put them in `auth`")
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Destination:
        """Each kind's own keys are required, the other kind's refused (with why)."""
        if self.kind == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"a DIMSE destination needs {', '.join(missing)} (or kind: dicomweb with url)"
                )
            web = [k for k in ("url", "auth", "ca_bundle") if getattr(self, k) is not None]
            if web:
                raise ValueError(f"{', '.join(web)}: only for kind: dicomweb")
            return self
        if self.url is None:
            raise ValueError("a DICOMweb destination needs url (the part before /studies)")
        dimse = [k for k in ("ae_title", "host", "port", "calling_ae_title") if getattr(self, k)]
        if dimse:
            raise ValueError(
                f"{', '.join(dimse)}: DIMSE settings; a DICOMweb destination is reached at url"
            )
        if self.storage_commitment:
            raise ValueError(
                "storage_commitment is a DIMSE service (PS3.4 Annex J) that STOW-RS does not "
                "have; remove it for a DICOMweb destination"
            )
        if self.tls is not None:
            raise ValueError(
                "tls is DICOM TLS for DIMSE; a DICOMweb destination uses an https:// url "
                "(and ca_bundle for a private CA)"
            )
        return self

    @property
    def address(self) -> str:
        """Where it is, for pages and messages (never credentials): host:port or url."""
        return self.url if self.kind == "dicomweb" else f"{self.host}:{self.port}"

    @field_validator("result_type")
    @classmethod
    def _not_fractional(cls, v: ResultType) -> ResultType:
        if v == ResultType.FRACTIONAL:
            raise ValueError(
                "FRACTIONAL is not a destination result_type: a pipeline with "
                "`probabilities: [fractional_seg]` sends its FRACTIONAL SEG to every "
                "destination that takes BINARY or LABELMAP SEG"
            )
        return v


class DimseSource(StrictModel):
    """A PACS the node may query (C-FIND) and retrieve studies from (C-MOVE or C-GET),
    Study Root Query/Retrieve Information Model (PS3.4 C.6.2)."""

    kind: Literal["dimse"]
    name: str = Field(description="Name used by retrieve requests (web form, API, CLI).")
    ae_title: str = Field(description="The source's AE title.")
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(
        None, description="AE title we present to the source (default: our ae_title)."
    )
    retrieve: Literal["move", "get"] = Field(
        "move",
        description="'move': C-MOVE to `move_destination` (the source must know that AE "
        "title with our host and port, and be in `peers`: it stores on a new "
        "association); 'get': C-GET (the source stores on our own association; no "
        "registration needed, where the source supports it).",
    )
    move_destination: str | None = Field(
        None,
        description="AE title the source knows this node by, the C-MOVE destination "
        "(default: our ae_title).",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Association and network timeout; also the longest wait for the "
        "next C-FIND / C-MOVE / C-GET response.",
    )

    _ae = field_validator("ae_title", "calling_ae_title", "move_destination")(
        classmethod(lambda cls, v: v if v is None else _check_ae_title(v))
    )


class DicomwebSource(StrictModel):
    """A DICOMweb server the node may query (QIDO-RS) and retrieve studies from (WADO-RS),
    PS3.18 10.4 and 10.6."""

    kind: Literal["dicomweb"]
    name: str = Field(description="Name used by retrieve requests (web form, API, CLI).")
    url: str = Field(
        description="Base URL of the DICOMweb service (the part before /studies), e.g. "
        "https://pacs.example/dicom-web."
    )
    auth: DicomwebAuth | None = Field(None, description="Credentials; empty: none.")
    ca_bundle: Path | None = Field(
        None,
        description="https: PEM file of the CAs trusted to sign the server's certificate "
        "(empty: the system's trust store).",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Connect and read timeout of each HTTP request."
    )

    _files = field_validator("ca_bundle")(classmethod(lambda cls, v: _existing_file(v)))

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url {v!r} must be an http:// or https:// URL")
        return v.strip().rstrip("/")


Source = Annotated[DimseSource | DicomwebSource, Field(discriminator="kind")]


class ListenerTls(StrictModel):
    """The DICOM TLS listener (PS3.15 B.1; IHE ATNA Secure Node): its own port beside, or
    instead of, the plain DICOM port."""

    enabled: bool = Field(False, description="Serve DICOM TLS on `port`.")
    port: int = Field(
        2762, ge=1, le=65535, description="DICOM TLS port (2762 is IANA's dicom-tls)."
    )
    serve_plain: bool = Field(
        True, description="Also serve plain DICOM on the top-level `port`; false: TLS only."
    )
    certificate: Path | None = Field(
        None, description="PEM certificate (chain) of the node, shown to every peer."
    )
    private_key: Path | None = Field(None, description="PEM private key of `certificate`.")
    ca_bundle: Path | None = Field(
        None, description="PEM file of the CAs trusted to sign peers' client certificates."
    )
    client_certificate: Literal["none", "optional", "required"] = Field(
        "required",
        description="'required' (mutual TLS, IHE ATNA): a peer without a certificate "
        "`ca_bundle` verifies is refused in the handshake; 'optional': verified when "
        "presented (peers entries with certificate_subject need one); 'none': not asked for.",
    )
    min_version: TlsVersion = Field("1.2", description="Lowest TLS version accepted.")
    ciphers: str = Field(
        MODERN_TLS12_CIPHERS, description="OpenSSL cipher list for TLS 1.2 connections."
    )

    _files = field_validator("certificate", "private_key", "ca_bundle")(
        classmethod(lambda cls, v: _existing_file(v))
    )

    @model_validator(mode="after")
    def _complete(self) -> ListenerTls:
        if not self.enabled:
            return self
        missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
        if self.client_certificate != "none" and self.ca_bundle is None:
            missing.append("ca_bundle")
        if missing:
            raise ValueError(f"enabled TLS needs {', '.join(missing)}")
        return self


class ListenerSettings(StrictModel):
    """Limits of the DICOM listener against hostile or broken peers (plain and TLS ports
    together; PS3.8 9.1.5 for the ARTIM timer)."""

    max_associations: int = Field(
        64,
        ge=1,
        description="Associations at once; the next request gets A-ASSOCIATE-RJ "
        "rejected-transient, local-limit-exceeded (PS3.8 9.3.4), senders retry later.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="TCP connections at once, counting those still negotiating; a "
        "connection over it is closed at once (nothing read, nothing answered).",
    )
    artim_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must complete its TLS handshake and then its "
        "A-ASSOCIATE-RQ within this time each, else it is closed (ARTIM).",
    )
    idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An association silent this long, or stalled this long in the middle "
        "of a PDU, is aborted.",
    )
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Receiving processes accepting from the DICOM port(s) (whichever is "
        "free takes the next connection), each with its own listener, spool writer and "
        "recorder; 1 = the node process alone. auto: one per CPU core, at most 8 (2 on a "
        "2-core machine, 8 on 32 cores). The limits above hold for all of them together.",
    )

    def receive_processes(self) -> int:
        """``processes`` with ``auto`` resolved for this machine."""
        if self.processes == "auto":
            return max(1, min(8, os.cpu_count() or 1))
        return self.processes


class HealthSettings(StrictModel):
    """How the node judges its destinations (dashboard banner, ``/healthz``, metrics).

    A destination is unreachable when the latest thing that happened with it failed: a
    send that got no association, or the periodic C-ECHO. Results waiting to be delivered
    longer than ``pending_alert_s`` turn the dashboard red too.
    """

    echo_interval_s: float = Field(
        60.0,
        ge=0,
        description="C-ECHO every destination this often and keep the answer (0: never; "
        "then only sends and the C-ECHO button tell).",
    )
    echo_timeout_s: float = Field(5.0, gt=0, description="Time limit of one C-ECHO.")
    pending_alert_s: float = Field(
        900.0,
        gt=0,
        description="A result or forward still undelivered this long after it was queued "
        "(or approved) raises the dashboard banner and makes /healthz 'degraded'.",
    )
    keep_echoes_days: float = Field(
        7.0, gt=0, description="C-ECHO answers older than this are deleted."
    )


class WebSettings(StrictModel):
    """The admin web app's listener (pages, JSON API, path API, health, metrics) and its
    logins: how long a session lives and the password policy (README: Security)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (tests).")
    session_max_age_s: float = Field(
        12 * 3600.0,
        gt=0,
        description="A login ends this long after it began, however active (log in again).",
    )
    session_idle_s: float = Field(
        1800.0,
        gt=0,
        description="A login ends after this long without activity by the user; a page "
        "refreshing itself is no activity.",
    )
    password_min_length: int = Field(
        12,
        ge=8,
        le=128,
        description="Fewest characters of a password (set by `user add`, `user "
        "reset-password`, the Users page or a user changing their own).",
    )
    stow_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A STOW-RS request whose body sends nothing this long ends there: what "
        "was stored is kept, the part in flight is dropped and its series are released (as "
        "the DICOM listener's idle_timeout_s does for a silent association).",
    )
    stow_max_instance_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Largest instance a STOW-RS request may carry (one part of the body; it "
        "is held in memory while its header is checked, as a C-STORE's is): a larger part "
        "fails with 0xA700 and is not stored.",
    )

    @model_validator(mode="after")
    def _idle_within_lifetime(self) -> WebSettings:
        if self.session_idle_s > self.session_max_age_s:
            raise ValueError("session_idle_s must not exceed session_max_age_s")
        return self


class PathApiSettings(StrictModel):
    """Where the HTTP path API (``POST /inference/<pipeline>``) may read images."""

    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Absolute folders whose files and sub-folders the path API may read, "
        "besides data_dir. Empty: only files under data_dir. A path outside them answers "
        "403 whether or not it exists.",
    )

    @field_validator("allowed_roots")
    @classmethod
    def _absolute(cls, v: list[Path]) -> list[Path]:
        for root in v:
            if not Path(root).is_absolute():
                raise ValueError(f"allowed root {root} must be an absolute path")
        return [Path(root) for root in v]


class GrpcSettings(StrictModel):
    """The path API over gRPC (``dicom_node.grpc_api``, README "gRPC"): the same calls,
    checks, roles and audit records as the HTTP path API. Off by default."""

    enabled: bool = Field(False, description="Serve the gRPC path API on `host`:`port`.")
    host: str = Field(
        "127.0.0.1", description="Bind address; 0.0.0.0 or [::] serves other machines."
    )
    port: int = Field(
        50051, ge=0, le=65535, description="gRPC port (50051 by custom); 0 picks a free one."
    )
    max_concurrent_calls: int = Field(
        16,
        ge=1,
        le=1024,
        description="Calls served at once (a call waiting for its mask and a status stream "
        "each hold one); more are refused with RESOURCE_EXHAUSTED.",
    )
    tls: bool = Field(
        False,
        description="Serve TLS with the node's certificate and key (`tls.certificate`, "
        "`tls.private_key`, the DICOM TLS listener's); false: plaintext HTTP/2, for "
        "127.0.0.1 or a TLS-terminating proxy only (tokens cross the network).",
    )


class SyslogSettings(StrictModel):
    """An RFC 5424 syslog collector the audit trail is forwarded to, record by record."""

    host: str = Field(description="The collector's host name or address.")
    port: int = Field(
        6514, ge=1, le=65535, description="514 for udp and tcp, 6514 for tls (RFC 5425)."
    )
    protocol: Literal["udp", "tcp", "tls"] = Field(
        "tls",
        description="'tls' (RFC 5425, octet-counted frames over TLS), 'tcp' (RFC 6587 "
        "octet counting) or 'udp' (RFC 5426, one record per datagram; may be lost).",
    )
    ca_bundle: Path | None = Field(
        None,
        description="tls: PEM file of the CAs trusted to sign the collector's certificate "
        "(empty: the system's trust store).",
    )
    facility: int = Field(
        10, ge=0, le=23, description="Syslog facility (10: security/authorization)."
    )
    app_name: str = Field("dicom-node", description="APP-NAME field of every message.")

    @field_validator("ca_bundle")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"file {v} does not exist")
        return v


class AuditSettings(StrictModel):
    """The audit trail (``dicom_node.audit``): always kept in the database; optionally
    forwarded to a syslog collector."""

    syslog: SyslogSettings | None = Field(
        None, description="Forward every audit record to this collector; empty: do not."
    )


class WorkerSettings(StrictModel):
    """Job workers: devices, retries, time limits, leases, and the Celery broker.

    Times are seconds. ``max_attempts`` / ``retry_backoff_s`` make the jobs' retry policy
    (``kernel.retry.RetryPolicy``): attempt n is retried ``retry_backoff_s * 2**(n-1)``
    seconds later.
    """

    enabled: bool = True
    device: str = Field(
        "auto", description="'auto' (one worker per CUDA GPU, else the CPU), 'cpu' or 'cuda:N'."
    )
    devices: list[str] = Field(
        default_factory=list, description="Several devices, one worker each (overrides device)."
    )
    poll_interval_s: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(
        10.0, ge=0, description="Delay before the first retry; doubles with each attempt."
    )
    time_limit_s: float = Field(3600.0, gt=0, description="Default time limit of one attempt.")
    pipeline_time_limits_s: dict[str, float] = Field(
        default_factory=dict, description="Time limit per pipeline name (overrides time_limit_s)."
    )
    heartbeat_s: float = Field(5.0, gt=0, description="How often a worker renews its job lease.")
    lease_s: float = Field(
        60.0, gt=0, description="A running job without heartbeat this long is requeued."
    )
    promote_after_s: float = Field(
        600.0, gt=0, description="A job waiting this long ranks as urgent (no starvation)."
    )
    max_queue_age_s: float | None = Field(
        None, gt=0, description="Queued jobs older than this expire (None: never)."
    )
    broker_url: str | None = Field(
        None, description="Celery broker (redis://..., amqp://...): jobs run on Celery workers."
    )
    celery_queue: str = Field("dicom-node", description="Celery queue name the jobs go to.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be 'auto', 'cpu' or 'cuda:N'")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        for d in v:
            if not (d == "cpu" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"device {d!r} must be 'cpu' or 'cuda:N'")
        return v

    def time_limit_for(self, pipeline: str) -> float:
        return self.pipeline_time_limits_s.get(pipeline, self.time_limit_s)


class DispatchSettings(StrictModel):
    """The outbox's retry policy and network timeouts (seconds); see ``kernel.outbox``."""

    retry_initial_s: float = Field(5.0, gt=0, description="First retry delay after a failed send.")
    retry_max_s: float = Field(300.0, gt=0, description="Cap of the exponential retry delay.")
    max_attempts: int = Field(
        20,
        ge=1,
        description="After this many retryable refusals the destination answered (e.g. "
        "0xA7xx out of resources) a row is failed. Sends it did not answer (no association, "
        "connection refused, timeout) do not count: they retry until max_age_s.",
    )
    max_age_s: float = Field(
        86400.0,
        gt=0,
        description="A row still not delivered this long after it was queued is failed "
        "(visible on the status page; resend queues it again): how long results wait out a "
        "destination that does not answer (e.g. a maintenance window), retried every "
        "retry_max_s at most.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Association / DIMSE timeout.")


class WebhookSettings(StrictModel):
    """Job status webhooks (``kernel.webhooks``): how the POSTs to a job's ``update_url``
    are signed, how long one may take, and how they are retried (seconds)."""

    secret_file: Path | None = Field(
        None,
        description="File holding the HMAC-SHA256 key (its text, surrounding whitespace "
        "removed); every POST carries X-Dicom-Node-Signature. Empty: POSTs are unsigned.",
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="Wall-clock limit of one POST in all: connect, send and the whole "
        "answer (a POST over it is retried).",
    )
    senders: int = Field(
        4, ge=1, le=64, description="POSTs in flight at once (at most 2 to one receiver)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (exact) or networks (CIDR, e.g. 127.0.0.1/32) an update_url "
        "may reach although they are loopback, link-local, unspecified, multicast or "
        "metadata addresses, which are refused otherwise. Private ranges need no entry.",
    )
    overdue_alert_s: float = Field(
        120.0,
        gt=0,
        description="A delivery due (or being POSTed) for longer than this makes /healthz "
        "degraded: the sender does not keep up.",
    )
    max_attempts: int = Field(
        10, ge=1, description="After this many failed POSTs (5xx, no answer) a delivery fails."
    )
    retry_initial_s: float = Field(5.0, gt=0, description="First retry delay; doubles each time.")
    retry_max_s: float = Field(600.0, gt=0, description="Cap of the retry delay.")

    _files = field_validator("secret_file")(classmethod(lambda cls, v: _existing_file(v)))

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        """Each entry a network (an address alone: that one) or a host name, lower case."""
        out = []
        for entry in v:
            text = entry.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                if not text or text[0] in "-." or not all(c.isalnum() or c in "-._" for c in text):
                    raise ValueError(
                        f"{entry!r} is neither a host name nor a network (CIDR); give no "
                        "scheme, port or path"
                    ) from None
                out.append(text)
            else:
                out.append(str(net))
        return out


class NodeSettings(BaseSettings):
    """Everything the node needs to know, validated at start (README.md: Settings).

    Built by ``load_settings`` from a YAML file and ``DICOM_NODE_*`` environment
    variables; an invalid value raises ``ConfigError`` naming each bad key. Paths in the
    file are relative to the file. Derived paths: ``spool_dir`` and ``results_dir`` under
    ``data_dir``; ``db_url`` is ``database_url`` or SQLite in ``data_dir/node.db``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    ae_title: str = "DICOM_NODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = None
    require_called_ae: bool = Field(
        False, description="Reject associations whose called AE title is not ours."
    )
    peers: list[Peer] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    result_destinations: list[str] | None = Field(
        None, description="Destinations every result goes to (default: all destinations)."
    )
    sources: list[Source] = Field(
        default_factory=list,
        description="PACS and DICOMweb servers studies may be retrieved from on request.",
    )
    rules_file: Path = REPO_ROOT / "routing_rules.yaml"
    models_file: Path = REPO_ROOT / "models.yaml"
    min_free_bytes: int = Field(
        1_000_000_000, ge=0, description="Free-disk watermark of the spool."
    )
    spool_fsync: bool = Field(
        True, description="fsync each instance before success (off only with a BBU cache)."
    )
    quiet_period_s: float = Field(5.0, ge=0)
    max_pdu_size: int = Field(
        1_048_576,
        ge=0,
        description="Largest P-DATA PDU we accept (the Maximum Length we negotiate); a PDU "
        "declaring more is refused with an A-ABORT before it is read. 0 = unlimited, "
        "which leaves memory per connection unbounded.",
    )
    tls: ListenerTls = Field(default_factory=ListenerTls)
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_patient_names: bool = False
    time_zone: str | None = Field(
        None,
        description="IANA time zone the pages show times in, e.g. Asia/Seoul (default: the "
        "system's). The database and the JSON API keep UTC.",
    )
    health: HealthSettings = Field(default_factory=HealthSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    path_api: PathApiSettings = Field(default_factory=PathApiSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name such as Asia/Seoul)"
            ) from None
        return v

    @model_validator(mode="after")
    def _check_destination_names(self) -> NodeSettings:
        names = [d.name for d in self.destinations]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {sorted(dupes)}")
        unknown = set(self.result_destinations or []) - set(names)
        if unknown:
            raise ValueError(f"result_destinations names unknown destinations: {sorted(unknown)}")
        sources = [x.name for x in self.sources]
        repeated = {n for n in sources if sources.count(n) > 1}
        if repeated:
            raise ValueError(f"source names must be unique, repeated: {sorted(repeated)}")
        return self

    @model_validator(mode="after")
    def _grpc_tls_has_a_certificate(self) -> NodeSettings:
        if self.grpc.enabled and self.grpc.tls:
            missing = [k for k in ("certificate", "private_key") if getattr(self.tls, k) is None]
            if missing:
                raise ValueError(
                    f"grpc.tls serves the node's certificate: set tls.{' and tls.'.join(missing)}"
                )
        return self

    # -- derived -----------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'node.db').resolve()}"

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"unknown destination {name!r}")

    def source(self, name: str) -> DimseSource | DicomwebSource:
        """The source named ``name``; KeyError naming the configured ones otherwise."""
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise KeyError(f"unknown source {name!r} (sources: {known})")

    def result_destination_names(self) -> list[str]:
        if self.result_destinations is not None:
            return list(self.result_destinations)
        return [d.name for d in self.destinations]

    def result_destination_list(self) -> list[Destination]:
        """The destinations every result goes to, with their SEG preferences."""
        return [self.destination(name) for name in self.result_destination_names()]

    def peer_allowed(
        self,
        calling_ae: str,
        address: str,
        over_tls: bool = False,
        subject: tuple[tuple[str, str], ...] | None = None,
    ) -> bool:
        """Whether a ``peers`` entry admits this association (see ``Peer.allows``)."""
        return any(p.allows(calling_ae, address, over_tls, subject) for p in self.peers)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so it overrides the file (passed as init kwargs).
        return (env_settings, init_settings)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


_TLS_FILE_KEYS = ("certificate", "private_key", "ca_bundle")


def _resolve_tls_paths(data: dict[str, Any], base: Path) -> None:
    """TLS files named in the settings file are relative to the file too."""
    sections = [data.get("tls")]
    if isinstance(data.get("destinations"), list):
        sections += [d.get("tls") for d in data["destinations"] if isinstance(d, dict)]
        for dest in data["destinations"]:  # a DICOMweb destination's CA bundle
            value = dest.get("ca_bundle") if isinstance(dest, dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                dest["ca_bundle"] = str(base / value)
    for section in sections:
        if not isinstance(section, dict):
            continue
        for key in _TLS_FILE_KEYS:
            value = section.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                section[key] = str(base / value)
    if isinstance(data.get("sources"), list):  # a DICOMweb source's CA bundle too
        for source in data["sources"]:
            value = source.get("ca_bundle") if isinstance(source, dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                source["ca_bundle"] = str(base / value)


def _resolve_audit_paths(data: dict[str, Any], base: Path) -> None:
    """The syslog collector's CA bundle named in the settings file is relative to it."""
    audit = data.get("audit")
    syslog = audit.get("syslog") if isinstance(audit, dict) else None
    if isinstance(syslog, dict):
        value = syslog.get("ca_bundle")
        if isinstance(value, str) and value and not Path(value).is_absolute():
            syslog["ca_bundle"] = str(base / value)


def load_settings(path: Path | str | None = None, **overrides: Any) -> NodeSettings:
    """Read the YAML settings file (if any), apply environment variables, validate.

    Raises ConfigError with one line per bad key. ``path`` defaults to
    ``$DICOM_NODE_CONFIG`` when that is set; no file at all is fine.
    """
    path = path or os.environ.get("DICOM_NODE_CONFIG")
    data: dict[str, Any] = {}
    source = "environment"
    if path:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"settings file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"settings file {path} must be a mapping of keys to values")
        data = loaded or {}
        base = path.resolve().parent
        for key in ("data_dir", "rules_file", "models_file"):  # relative to the file
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
        _resolve_tls_paths(data, base)
        _resolve_audit_paths(data, base)
        hooks = data.get("webhooks")  # the webhook secret too
        secret = hooks.get("secret_file") if isinstance(hooks, dict) else None
        if isinstance(secret, str) and secret and not Path(secret).is_absolute():
            hooks["secret_file"] = str(base / secret)
    data.update(overrides)
    try:
        return NodeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
