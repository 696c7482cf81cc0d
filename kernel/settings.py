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
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
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


class Peer(StrictModel):
    """A remote AE allowed to associate with this node (default deny)."""

    ae_title: str = Field(description="Calling AE title, or '*' for any AE title from host.")
    host: str = Field(description="Source IP address or network (CIDR) the peer connects from.")
    port: int | None = Field(None, ge=1, le=65535, description="The peer's own SCP port.")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v.strip() if v.strip() == "*" else _check_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        ipaddress.ip_network(v.strip(), strict=False)  # raises ValueError on a bad address
        return v.strip()

    def allows(self, calling_ae: str, address: str) -> bool:
        if self.ae_title != "*" and self.ae_title != calling_ae.strip():
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class Destination(StrictModel):
    """A DICOM AE results (and forwarded originals) are sent to by C-STORE."""

    name: str = Field(description="Name used by routing rules and the status page.")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
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

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


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
    """The admin web app's listener (pages, JSON API, path API, health, metrics)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (tests).")


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
    max_attempts: int = Field(20, ge=1, description="After this many failed sends a row is failed.")
    max_age_s: float = Field(
        86400.0,
        gt=0,
        description="A row still not delivered this long after it was queued is failed "
        "(visible on the status page; resend queues it again).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Association / DIMSE timeout.")


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
    rules_file: Path = REPO_ROOT / "routing_rules.yaml"
    models_file: Path = REPO_ROOT / "models.yaml"
    min_free_bytes: int = Field(
        1_000_000_000, ge=0, description="Free-disk watermark of the spool."
    )
    spool_fsync: bool = Field(
        True, description="fsync each instance before success (off only with a BBU cache)."
    )
    quiet_period_s: float = Field(5.0, ge=0)
    max_pdu_size: int = Field(0, ge=0, description="0 = unlimited (fastest).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_patient_names: bool = False
    time_zone: str | None = Field(
        None,
        description="IANA time zone the pages show times in, e.g. Asia/Seoul (default: the "
        "system's). The database and the JSON API keep UTC.",
    )
    health: HealthSettings = Field(default_factory=HealthSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)

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

    def result_destination_names(self) -> list[str]:
        if self.result_destinations is not None:
            return list(self.result_destinations)
        return [d.name for d in self.destinations]

    def result_destination_list(self) -> list[Destination]:
        """The destinations every result goes to, with their SEG preferences."""
        return [self.destination(name) for name in self.result_destination_names()]

    def peer_allowed(self, calling_ae: str, address: str) -> bool:
        return any(p.allows(calling_ae, address) for p in self.peers)

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
    data.update(overrides)
    try:
        return NodeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
