"""``dicom-node user add`` names the database it writes to, refuses to guess one, and never
ends in a traceback without a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _cli(args: list[str], cwd: Path, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


def test_user_add_without_settings_refuses_and_names_the_database(tmp_path):
    r = _cli(["user", "add", "alice", "--role", "admin"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"sqlite:///{tmp_path / 'data' / 'node.db'}" in r.stderr
    assert "-c" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing created in the current folder


def test_user_add_without_a_terminal_asks_for_password_stdin(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(f"data_dir: {tmp_path / 'node'}\n")
    r = _cli(["-c", str(config), "user", "add", "alice", "--role", "reviewer"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--password-stdin" in r.stderr
    r = _cli(
        ["-c", str(config), "user", "add", "alice", "--role", "reviewer", "--password-stdin"],
        tmp_path,
        stdin="correct horse battery\n",
    )
    assert r.returncode == 0, r.stderr
    assert f"user alice (reviewer) created in sqlite:///{tmp_path / 'node' / 'node.db'}" in r.stdout
    r = _cli(["-c", str(config), "user", "list"], tmp_path)
    assert r.stdout.startswith("alice\treviewer\t")
