"""`dicom-node serve` as operators run it: configured by environment, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

from devkit.net import free_port, wait_for_port
from dicom_node.echo import echo
from tests.conftest import storescu
from tests.dicom_factory import ct_series


def test_serve_from_environment_receives_and_stops_cleanly_on_sigterm(tmp_path):
    port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "DICOM_NODE_AE_TITLE": "DICOM_NODE",
        "DICOM_NODE_BIND_ADDRESS": "127.0.0.1",
        "DICOM_NODE_PORT": str(port),
        "DICOM_NODE_DATA_DIR": str(tmp_path / "data"),
        "DICOM_NODE_PEERS": json.dumps([{"ae_title": "*", "host": "127.0.0.1"}]),
        "DICOM_NODE_MIN_FREE_BYTES": "0",
        "DICOM_NODE_QUIET_PERIOD_S": "0.5",
        "DICOM_NODE_WEB__PORT": str(web_port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port, 60)
        assert echo("127.0.0.1", port, "DICOM_NODE")
        files = ct_series(tmp_path / "in", n=3, description="LOCALIZER")
        assert storescu(files, port).returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10) as r:
            health = json.load(r)
        assert health["status"] == "ok" and health["database"] == "ok"

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # /api/queue needs a login now; the database says the same.
            with sqlite3.connect(tmp_path / "data" / "node.db") as conn:
                query = "SELECT count(*) FROM series WHERE state = 'complete'"
                if conn.execute(query).fetchone()[0] == 1:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("series never completed")

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert time.monotonic() - started < 30
        assert "stopped" in output
        assert "TEST^SECRET" not in output  # no patient names in the log
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 3


def test_serve_with_its_web_port_taken_exits_with_the_reason_instead_of_hanging(tmp_path):
    """The web port is in use: `serve` stops what it had started (listener, loops, the
    worker) and exits 2 naming the address, instead of running without its console or
    hanging on the threads it had started."""
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    web_port = taken.getsockname()[1]
    env = {
        **os.environ,
        "DICOM_NODE_BIND_ADDRESS": "127.0.0.1",
        "DICOM_NODE_PORT": str(port),
        "DICOM_NODE_DATA_DIR": str(tmp_path / "data"),
        "DICOM_NODE_MIN_FREE_BYTES": "0",
        "DICOM_NODE_WEB__HOST": "127.0.0.1",
        "DICOM_NODE_WEB__PORT": str(web_port),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        taken.close()
    assert done.returncode == 2, done.stdout + done.stderr  # a settings error
    assert f"cannot listen on 127.0.0.1:{web_port}" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
