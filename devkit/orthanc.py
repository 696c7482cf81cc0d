"""Run a real Orthanc PACS as a child process, for the demo, the tests and the benchmarks.

``OrthancServer`` writes a JSON configuration into a work folder (storage and index live
there too), starts ``/usr/sbin/Orthanc``, waits until both the REST API and the DICOM port
answer, and stops the process by its PID. A few REST helpers cover what tests need: find
an instance by SOPInstanceUID, fetch its file, read its tags, count instances.

Listening addresses (Orthanc 1.10.1, Debian bookworm): Orthanc has no configuration key
that binds its HTTP or DICOM server to one address; both listen on 0.0.0.0 (IPv4, all
interfaces). What this module does instead:

- HTTP: ``RemoteAccessAllowed: false`` makes Orthanc answer 403 to every client that is
  not on the loopback interface; authentication is off because only localhost may talk.
- DICOM: the port is a random free one and lives only as long as the test. With
  ``accept_unknown_peers=False`` only the configured ``modalities`` may associate, and
  ``DicomCheckModalityHost`` makes Orthanc check their address too (all 127.0.0.1 here).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from devkit import net
from dicom_node.echo import echo

DEFAULT_EXECUTABLE = "/usr/sbin/Orthanc"
HOST = "127.0.0.1"
LOG_NAME = "orthanc.log"
CONFIG_NAME = "orthanc.json"

# Orthanc needs ~2-3 s to shut down cleanly (it closes the DICOM server last).
_STOP_GRACE_S = 10.0
_LOG_TAIL_LINES = 30
# Orthanc's DICOM layer is DCMTK, which sets TCP_NODELAY on its sockets only when this
# environment variable asks for it. Without it each C-STORE response waits for the peer's
# delayed ACK and Orthanc receives ~20 images/s instead of ~200 on loopback.
DCMTK_ENV = {"TCP_NODELAY": "1"}
# A port picked by free_port() can be taken by someone else before Orthanc binds it.
_START_ATTEMPTS = 3


class OrthancError(RuntimeError):
    """Orthanc did not start, died, or answered a REST call with an error."""


def orthanc_executable() -> str | None:
    """Path of the Orthanc binary, or None when it is not installed."""
    if Path(DEFAULT_EXECUTABLE).is_file() and os.access(DEFAULT_EXECUTABLE, os.X_OK):
        return DEFAULT_EXECUTABLE
    return shutil.which("Orthanc")


def orthanc_available() -> bool:
    """True when an Orthanc executable can be found (``/usr/sbin/Orthanc`` or on PATH)."""
    return orthanc_executable() is not None


class OrthancServer:
    """One Orthanc process with its own storage, configuration and log in ``workdir``.

    Parameters
    ----------
    workdir:
        Folder for the configuration, the storage/index and ``orthanc.log``; created if
        missing. Use a fresh folder per server: an existing storage is reused.
    aet:
        Orthanc's own AE title. ``DicomCheckCalledAet`` is on, so senders must use it.
    dicom_port, http_port:
        Fixed ports, or None to pick free ones on 127.0.0.1 at start.
    modalities:
        ``name -> (AE title, host, port)`` of peers Orthanc may send to (C-STORE SCU,
        C-ECHO) and, with ``accept_unknown_peers=False``, the only peers it accepts.
    executable:
        The Orthanc binary; default ``/usr/sbin/Orthanc`` or ``Orthanc`` on PATH.
    accept_unknown_peers:
        True (default): any calling AE may C-ECHO and C-STORE. False: only ``modalities``,
        and only from their configured host.
    extra_config:
        Further Orthanc configuration keys, applied last (e.g. ``{"OverwriteInstances":
        True}``).
    throwaway:
        True: nobody reads the storage after the server ends (a test's server), so leaving
        a ``with`` block kills Orthanc at once (``stop(graceful=False)``) instead of
        waiting the 2-3 s of its own shutdown. An explicit ``stop()`` stays graceful.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        executable: str | None = None,
        accept_unknown_peers: bool = True,
        extra_config: dict[str, Any] | None = None,
        throwaway: bool = False,
    ) -> None:
        if not aet or len(aet) > 16:
            raise ValueError(f"Orthanc AE title {aet!r} must be 1 to 16 characters")
        for name, (peer_aet, host, port) in (modalities or {}).items():
            if not peer_aet or len(peer_aet) > 16:
                raise ValueError(f"modality {name!r}: AE title {peer_aet!r} must be 1-16 chars")
            if not 0 < int(port) < 65536:
                raise ValueError(f"modality {name!r}: port {port!r} is not a TCP port")
            if not host:
                raise ValueError(f"modality {name!r}: host is empty")
        self.workdir = Path(workdir)
        self._aet = aet
        self._fixed_dicom_port = dicom_port
        self._fixed_http_port = http_port
        self._dicom_port = dicom_port or 0
        self._http_port = http_port or 0
        self.modalities = dict(modalities or {})
        self._executable = executable
        self.accept_unknown_peers = accept_unknown_peers
        self.extra_config = dict(extra_config or {})
        self.throwaway = throwaway
        self._process: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        # Never route loopback REST calls through a proxy taken from the environment.
        self._session.trust_env = False

    # -- properties ---------------------------------------------------------------------

    @property
    def aet(self) -> str:
        return self._aet

    @property
    def host(self) -> str:
        return HOST

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://{HOST}:{self._http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_NAME

    @property
    def config_path(self) -> Path:
        return self.workdir / CONFIG_NAME

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this server runs with (written to ``orthanc.json``)."""
        storage = str((self.workdir / "storage").resolve())
        cfg: dict[str, Any] = {
            "Name": f"test-{self._aet}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "Plugins": [],  # do not load the Debian-packaged plugins
            "HttpServerEnabled": True,
            "HttpPort": self._http_port,
            "RemoteAccessAllowed": False,  # 403 for anything not on loopback (no bind key)
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            "DicomServerEnabled": True,
            "DicomAet": self._aet,
            "DicomPort": self._dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": self.accept_unknown_peers,
            "DicomAlwaysAllowStore": self.accept_unknown_peers,
            "DicomCheckModalityHost": not self.accept_unknown_peers,
            "DicomModalities": {
                name: [peer_aet, host, int(port)]
                for name, (peer_aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            "HttpProxy": "",
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout_s: float = 30) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until REST and DICOM answer.

        Raises ``OrthancError`` with the tail of ``orthanc.log`` when the binary is
        missing, the process exits, or it does not answer within ``timeout_s``.
        """
        if self.is_running():
            return self
        executable = self._executable or orthanc_executable()
        if executable is None:
            raise OrthancError(
                "Orthanc is not installed: install the Debian package 'orthanc' "
                f"(expected {DEFAULT_EXECUTABLE} or 'Orthanc' on PATH)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        auto_ports = self._fixed_dicom_port is None or self._fixed_http_port is None
        attempts = _START_ATTEMPTS if auto_ports else 1
        for attempt in range(1, attempts + 1):
            self._pick_ports()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            self._spawn(executable)
            try:
                self._wait_until_ready(timeout_s)
                return self
            except OrthancError:
                log_tail = self.log_tail()
                self.stop()
                port_taken = "address already in use" in log_tail.lower()
                if not (port_taken and attempt < attempts):
                    raise
        raise AssertionError("unreachable")

    def stop(self, graceful: bool = True) -> None:
        """Stop Orthanc by its PID: SIGTERM, then SIGKILL after a grace period. Idempotent.

        ``graceful=False`` sends SIGKILL at once: for a throw-away server whose storage
        nobody reads again (a test's teardown), which spares the 2-3 s Orthanc's own
        shutdown takes (its HTTP and DICOM servers each finish a one-second poll).
        """
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=_STOP_GRACE_S)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(graceful=not self.throwaway)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of ``orthanc.log`` (empty when there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _pick_ports(self) -> None:
        self._http_port = self._fixed_http_port or net.free_port(HOST)
        self._dicom_port = self._fixed_dicom_port or net.free_port(HOST)
        while self._dicom_port == self._http_port:
            self._dicom_port = net.free_port(HOST)

    def _spawn(self, executable: str) -> None:
        # Orthanc logs to stderr by default; send both streams to one file in workdir.
        with open(self.log_path, "ab") as log:
            # A new session keeps a Ctrl-C in the terminal from reaching Orthanc before
            # stop() runs; atexit covers an interpreter that exits without stop().
            try:
                self._process = subprocess.Popen(
                    [executable, str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env={**os.environ, **DCMTK_ENV},
                    start_new_session=True,
                )
            except OSError as exc:
                raise OrthancError(f"cannot run Orthanc executable {executable!r}: {exc}") from exc
        atexit.register(self.stop)

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        rest_ok = dicom_ok = False
        while True:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process is not None else None
                raise OrthancError(
                    f"Orthanc exited with code {code} while starting "
                    f"(config {self.config_path}); last log lines:\n{self.log_tail()}"
                )
            if not rest_ok:
                try:
                    rest_ok = self._session.get(f"{self.url}/system", timeout=1).ok
                except requests.RequestException:
                    rest_ok = False
            if rest_ok and not dicom_ok:
                dicom_ok = net.port_is_open(HOST, self._dicom_port)
            if rest_ok and dicom_ok:
                return
            if time.monotonic() >= deadline:
                raise OrthancError(
                    f"Orthanc did not answer within {timeout_s:g} s (REST {self.url}: "
                    f"{'up' if rest_ok else 'down'}, DICOM {HOST}:{self._dicom_port}: "
                    f"{'up' if dicom_ok else 'down'}); last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    # -- REST ---------------------------------------------------------------------------

    def rest(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One REST call, e.g. ``rest("GET", "/statistics")``; raises OrthancError on 4xx/5xx."""
        kwargs.setdefault("timeout", 30)
        try:
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        except requests.ConnectionError:
            # Orthanc closes idle keep-alive connections; a reused one then fails before
            # the request is read. Every call made here is safe to repeat: try once more
            # on a fresh connection.
            self._session.close()
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        if not response.ok:
            raise OrthancError(
                f"Orthanc {method} {path} answered {response.status_code}: {response.text[:500]}"
            )
        return response

    def get_json(self, path: str) -> Any:
        return self.rest("GET", path).json()

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def statistics(self) -> dict[str, Any]:
        return self.get_json("/statistics")

    def count_instances(self) -> int:
        """Number of instances stored, from ``/statistics``."""
        return int(self.statistics()["CountInstances"])

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return list(self.get_json("/instances"))

    def find_instance(self, sop_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOPInstanceUID, or None."""
        return self._lookup(sop_uid, "Instance")

    def find_series(self, series_uid: str) -> str | None:
        """Orthanc ID of the series with this SeriesInstanceUID, or None."""
        return self._lookup(series_uid, "Series")

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc ID of the study with this StudyInstanceUID, or None."""
        return self._lookup(study_uid, "Study")

    def _lookup(self, uid: str, resource_type: str) -> str | None:
        matches = self.rest("POST", "/tools/lookup", data=uid).json()
        for match in matches:
            if match.get("Type") == resource_type:
                return str(match["ID"])
        return None

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance exactly as Orthanc stored it."""
        return self.rest("GET", f"/instances/{instance_id}/file").content

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags of an instance keyed by keyword (Orthanc's simplified-tags)."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (Orthanc's expanded series records), [] when unknown."""
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        return list(self.get_json(f"/studies/{study_id}/series"))

    def instances_of_series(self, series_uid: str) -> list[str]:
        """Orthanc instance IDs of a series, [] when unknown."""
        series_id = self.find_series(series_uid)
        if series_id is None:
            return []
        return [str(i["ID"]) for i in self.get_json(f"/series/{series_id}/instances")]

    def upload(self, dicom_bytes: bytes) -> str:
        """Store one DICOM file through REST (no DICOM network); returns its instance ID."""
        answer = self.rest(
            "POST", "/instances", data=dicom_bytes, headers={"Content-Type": "application/dicom"}
        ).json()
        return str(answer["ID"])

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient_id in self.get_json("/patients"):
            self.rest("DELETE", f"/patients/{patient_id}")

    def wait_for_instance(self, sop_uid: str, timeout_s: float = 30) -> str:
        """Poll until the instance with ``sop_uid`` is stored; returns its Orthanc ID."""
        deadline = time.monotonic() + timeout_s
        while True:
            instance_id = self.find_instance(sop_uid)
            if instance_id is not None:
                return instance_id
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Orthanc {self._aet} at {HOST}:{self._dicom_port} did not receive "
                    f"SOPInstanceUID {sop_uid} within {timeout_s:g} s"
                )
            time.sleep(0.2)

    def echo(self, calling_ae: str = "ECHOSCU", timeout_s: float = 5) -> bool:
        """C-ECHO this Orthanc over DICOM."""
        return echo(HOST, self._dicom_port, self._aet, calling_ae, timeout_s)

    def echo_modality(self, name: str) -> bool:
        """Ask Orthanc to C-ECHO one of its configured modalities (tests outbound config)."""
        try:
            self.rest("POST", f"/modalities/{name}/echo", data="{}")
        except OrthancError:
            return False
        return True
