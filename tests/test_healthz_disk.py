"""/healthz and /readyz when the spool's disk is full (issue 16).

With ``min_free_bytes: 0`` the node used to say "ok" at 0 bytes free while every C-STORE
was refused. The spool here is a real 1 MiB tmpfs filled to the last byte (mounting needs
root, as ``./run.sh test`` runs; the test fails, it does not skip, without it).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import storescu
from tests.dicom_factory import ct_series
from tests.web_helpers import client_for, modelless_settings


def _mount_full_tmpfs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a 1 MiB tmpfs on {folder} (needs root): {proc.stderr}")
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def test_healthz_reports_a_full_spool_disk(tmp_path, start_node):
    spool = tmp_path / "node" / "spool"
    try:
        filler = _mount_full_tmpfs(spool)
        node = start_node(min_free_bytes=0, web={"enabled": False}, **modelless_settings(tmp_path))
        client = client_for(node)

        health = client.get("/healthz")
        ready = client.get("/readyz")
        sent = storescu(
            ct_series(tmp_path / "series", n=1), node.scp.port, "DICOM_NODE", "SCU", "-v"
        )

        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded"
        assert (body["spool"], body["spool_free_bytes"], body["spool_min_free_bytes"]) == (
            "full", 0, 0,
        )  # fmt: skip
        assert body["spool_total_bytes"] == 1 << 20
        assert any(r.startswith("spool disk full: 0 B free") for r in body["reasons"])
        assert ready.status_code == 503
        # What /healthz says is what a sender gets: 0xA700 Out of Resources.
        assert sent.returncode != 0 and "Refused: OutOfResources" in sent.stderr, sent.stderr

        filler.unlink()
        body = client.get("/healthz").json()
        assert (body["status"], body["spool"]) == ("ok", "ok")
        assert client.get("/readyz").status_code == 200
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)
