"""Shared fixtures: databases (SQLite and the real PostgreSQL), Orthanc, a running node."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from db.migrate import upgrade
from db.session import Database
from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from kernel.settings import NodeSettings, load_settings

# Several test runs at once (engineers sharing one machine) each set their own database;
# the workers of one run (pytest-xdist) each get theirs, the name suffixed with the worker's
# (created on first use).
_POSTGRES_BASE_URL = os.environ.get(
    "DICOM_NODE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
POSTGRES_URL = (
    f"{_POSTGRES_BASE_URL}_{_XDIST_WORKER}" if _XDIST_WORKER.isalnum() else _POSTGRES_BASE_URL
)
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


# The files whose tests take longest (~110 to ~30 s each on the 2-core CI machine, from
# `--durations`), in that order: collected first, so that the two workers of `./run.sh
# test` (one file each at a time) do not end with one of them running a long file alone.
LONGEST_FILES = (
    "test_totalsegmentator.py",
    "test_engine.py",
    "test_input_variety.py",
    "test_queue_worker.py",
    "test_receive_durability.py",
    "test_dicomweb_destination.py",
    "test_end_to_end.py",
    "test_inference_api.py",
    "test_tilt.py",
    "test_queue_node.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``LONGEST_FILES`` first; every other file, and the tests within a file, in the
    usual order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _postgres_up() -> bool:
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
        return True
    except sqlalchemy.exc.OperationalError:
        return False


def _create_worker_database() -> None:
    """CREATE DATABASE for this xdist worker's ``POSTGRES_URL`` if the server lacks it."""
    url = sqlalchemy.engine.make_url(POSTGRES_URL)
    engine = sqlalchemy.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": url.database},
            ).first()
            if not exists:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{url.database}"'))
    except sqlalchemy.exc.OperationalError:
        return  # the server is down: ensure_postgres starts it and asks again
    finally:
        engine.dispose()


def ensure_postgres() -> str:
    """The test PostgreSQL, started if it is down; fails (never skips) if it cannot be."""
    if POSTGRES_URL != _POSTGRES_BASE_URL:
        _create_worker_database()
    if not _postgres_up():
        subprocess.run(POSTGRES_START, shell=True, check=False, capture_output=True)
        deadline = time.monotonic() + 30
        while not _postgres_up():
            if POSTGRES_URL != _POSTGRES_BASE_URL:
                _create_worker_database()
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL at {POSTGRES_URL} is down and `{POSTGRES_START}` failed")
            time.sleep(0.5)
    return POSTGRES_URL


def reset_postgres(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE"))
        conn.execute(sqlalchemy.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: SQLite in tmp_path, or the real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
    else:
        url = ensure_postgres()
        reset_postgres(url)
    upgrade(url)
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A real Orthanc PACS on free loopback ports (fails if Orthanc is not installed);
    killed at the end (its storage is thrown away: no need for its 2-3 s shutdown)."""
    with OrthancServer(tmp_path / "orthanc", aet="ORTHANC", throwaway=True) as server:
        yield server


def node_settings(tmp_path: Path, **overrides: Any) -> NodeSettings:
    base: dict[str, Any] = dict(
        ae_title="DICOM_NODE",
        bind_address="127.0.0.1",
        port=free_port(),
        data_dir=tmp_path / "node",
        peers=[{"ae_title": "*", "host": "127.0.0.1"}],
        min_free_bytes=0,
        quiet_period_s=0.5,
        web={"host": "127.0.0.1", "port": 0},
        worker={"poll_interval_s": 0.1},
        dispatch={"retry_initial_s": 0.5, "retry_max_s": 2.0},
    )
    base.update(overrides)
    # In-process nodes receive in this process unless a test asks for receiving processes.
    base["listener"] = {"processes": 1, **base.get("listener", {})}
    return load_settings(None, **base)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: start_node(**settings overrides) -> a running in-process Node."""
    from dicom_node.service import Node

    nodes: list[Node] = []

    def _start(**overrides: Any) -> Node:
        # A job still running at the end of a test is abandoned after 3 s (then requeued).
        # The DICOM port free_port() picked can be taken before the node binds it (e.g. as
        # the local port of another test's outgoing connection): then pick another, unless
        # the test chose the port.
        for attempt in range(3):
            try:
                node = Node(node_settings(tmp_path, **overrides), stop_grace_s=3).start()
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or "port" in overrides or attempt == 2:
                    raise
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


def storescu(
    files: list[Path],
    port: int,
    called_ae: str = "DICOM_NODE",
    calling_ae: str = "TEST_SCU",
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu over one association."""
    exe = dcmtk_tool("storescu")
    if exe is None:
        pytest.fail("DCMTK storescu is not installed (apt-get install dcmtk)")
    return subprocess.run(
        [
            exe,
            *extra,
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)
