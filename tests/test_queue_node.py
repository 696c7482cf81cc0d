"""`dicom-node serve` killed with -9 in the middle of a job: after a restart the job runs
again and completes, with one result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from db.models import Job, Result
from db.session import Database
from devkit.net import free_port, wait_for_port
from devkit.synth import generate_study
from tests.conftest import storescu, wait_until
from tests.test_queue_support import models_file, rules_file

pytestmark = pytest.mark.slow


def _serve(env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve"], env=env, stdout=log, stderr=log
    )


def test_node_killed_mid_job_completes_the_job_after_restart(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")},
        "DICOM_NODE_BIND_ADDRESS": "127.0.0.1",
        "DICOM_NODE_PORT": str(port),
        "DICOM_NODE_DATA_DIR": str(data),
        "DICOM_NODE_PEERS": json.dumps([{"ae_title": "*", "host": "127.0.0.1"}]),
        "DICOM_NODE_MIN_FREE_BYTES": "0",
        "DICOM_NODE_QUIET_PERIOD_S": "0.5",
        "DICOM_NODE_WEB__ENABLED": "false",
        "DICOM_NODE_MODELS_FILE": str(models_file(tmp_path)),
        "DICOM_NODE_RULES_FILE": str(rules_file(tmp_path)),
        "DICOM_NODE_WORKER__DEVICE": "cpu",
        "DICOM_NODE_WORKER__POLL_INTERVAL_S": "0.2",
    }
    study = generate_study(
        tmp_path / "study", seed=5, phases="P", rows=128, columns=128, pixel_spacing_mm=3.0
    )
    log = (tmp_path / "node.log").open("ab")
    node = _serve(env, log)
    db = Database(f"sqlite:///{data / 'node.db'}")
    try:
        wait_for_port("127.0.0.1", port, 60)
        assert storescu(study.series[0].files, port).returncode == 0

        def job() -> Job | None:
            with db.session() as s:
                return s.scalars(select(Job)).first()

        wait_until(lambda: (j := job()) and j.state == "running", 120, "the job running")
        time.sleep(0.3)
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        assert job().state == "running"  # killed mid-job

        node = _serve(env, log)
        wait_until(lambda: job().state == "done", 180, "the job done after the restart")
        assert job().attempts == 1  # a stopped node does not cost the job an attempt
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Result)) == 1
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        db.dispose()
