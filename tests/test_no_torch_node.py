"""The node process never imports the model side (issue 18: the dicom-node image has none).

``dicom-node serve`` runs in a subprocess whose ``sitecustomize`` hides torch, nnU-Net,
TotalSegmentator, SimpleITK, SciPy and NiBabel (the packages docker/Dockerfile.node leaves
out) and records every attempt to import them. With the worker disabled the node starts,
answers DCMTK's echoscu, receives a study from storescu, routes it with the shipped rules
and models (pins checked, checkpoints read without torch), forwards it to a real Orthanc,
and serves the web app to a logged-in admin; nothing so much as tries to import the model
side. With workers asked for where torch is missing it refuses to start, saying what to
do. With torch installed and the embedded worker on, a job runs in the worker child and
the node process itself still never imports torch or loads a model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import select

from db.models import Job
from db.session import Database
from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from kernel.settings import REPO_ROOT
from tests.conftest import storescu, wait_until
from tests.test_queue_support import models_file, rules_file

MODEL_SIDE = ("torch", "nnunetv2", "totalsegmentator", "SimpleITK", "scipy", "nibabel")
PASSWORD = "correct horse battery staple"

# Installed in the node's interpreter before anything else runs. "hide": importing the
# model side fails as if it were not installed (and is recorded); "watch": model-side
# modules loaded in the main process are recorded at exit (the worker child is spawned
# by multiprocessing and is left alone: models load there).
SITECUSTOMIZE = """
import atexit, multiprocessing, os, sys
_NAMES = set(os.environ["DICOM_NODE_TEST_MODEL_SIDE"].split(","))
_LOG = os.environ["DICOM_NODE_TEST_IMPORT_LOG"]
_MODE = os.environ["DICOM_NODE_TEST_MODE"]

def _record(line):
    with open(_LOG, "a") as f:
        f.write(line + "\\n")

class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _NAMES:
            _record(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

if _MODE == "hide":
    sys.meta_path.insert(0, _Hidden())
else:
    @atexit.register
    def _loaded():
        if multiprocessing.parent_process() is None:
            for name in sorted(sys.modules):
                if name.partition(".")[0] in _NAMES:
                    _record(name)
"""


def node_env(tmp_path: Path, mode: str) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "model-side-imports.txt"
    log.write_text("")
    return {
        **os.environ,
        "PYTHONPATH": f"{hook}{os.pathsep}{REPO_ROOT}",
        "DICOM_NODE_TEST_MODEL_SIDE": ",".join(MODEL_SIDE),
        "DICOM_NODE_TEST_IMPORT_LOG": str(log),
        "DICOM_NODE_TEST_MODE": mode,
        "OMP_NUM_THREADS": "2",
    }


def write_settings(tmp_path: Path, **overrides: Any) -> Path:
    settings: dict[str, Any] = {
        "ae_title": "DICOM_NODE",
        "bind_address": "127.0.0.1",
        "port": free_port(),
        "data_dir": str(tmp_path / "node"),
        "peers": [{"ae_title": "*", "host": "127.0.0.1"}],
        "min_free_bytes": 0,
        "quiet_period_s": 0.5,
        "models_file": str(REPO_ROOT / "models.yaml"),
        "web": {"host": "127.0.0.1", "port": free_port()},
        "worker": {"enabled": False},
        "dispatch": {"retry_initial_s": 0.5},
        "log_level": "WARNING",
    }
    settings.update(overrides)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def dicom_node(config: Path, env: dict[str, str], *args: str, **kw: Any) -> Any:
    exe = Path(sys.executable).parent / "dicom-node"
    return subprocess.run(
        [str(exe), "-c", str(config), *args], env=env, capture_output=True, text=True, **kw
    )


class Serving:
    """``dicom-node serve`` in a subprocess until ``stop()`` (SIGTERM)."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.settings = yaml.safe_load(config.read_text())
        self.web = f"http://127.0.0.1:{self.settings['web']['port']}"
        exe = Path(sys.executable).parent / "dicom-node"
        self.proc = subprocess.Popen(
            [str(exe), "-c", str(config), "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() - started > 60:
                self.stop()
                pytest.fail(f"the node did not start: {self.stderr[-3000:]}")
            time.sleep(0.1)
        self.start_s = time.monotonic() - started

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.web}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
        return self.proc.returncode

    stderr = ""


def logged_in(web: str) -> requests.Session:
    session = requests.Session()
    page = session.get(f"{web}/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    answer = session.post(
        f"{web}/login",
        data={"username": "ada", "password": PASSWORD, "csrf_token": token, "next": "/"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 303, answer.text[-500:]
    return session


def test_node_receives_routes_sends_and_serves_without_the_model_side(tmp_path: Path) -> None:
    rules = yaml.safe_load((REPO_ROOT / "routing_rules.yaml").read_text(encoding="utf-8"))
    rules["rules"].insert(
        0, {"name": "every-ct-to-pacs", "when": {"Modality": "CT"}, "forward": ["pacs"]}
    )
    rules_path = tmp_path / "routing_rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    env = node_env(tmp_path, "hide")
    with OrthancServer(tmp_path / "orthanc", aet="ORTHANC", throwaway=True) as pacs:
        config = write_settings(
            tmp_path,
            rules_file=str(rules_path),
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                }
            ],
        )
        added = dicom_node(
            config, env, "user", "add", "ada", "--role", "admin", "--password-stdin",
            input=PASSWORD + "\n", timeout=120,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr[-2000:]
        node = Serving(config, env)
        try:
            port = str(node.settings["port"])
            echo = subprocess.run(
                [dcmtk_tool("echoscu") or "echoscu", "-aec", "DICOM_NODE", "127.0.0.1", port],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert echo.returncode == 0, echo.stderr
            study = generate_study(
                tmp_path / "study", seed=31, phases="P", rows=64, columns=64,
                pixel_spacing_mm=6.0, slices=8,
            )  # fmt: skip
            files = study.series[0].files
            assert storescu(files, node.settings["port"]).returncode == 0
            wait_until(lambda: pacs.count_instances() == len(files), 60, "forwarded to Orthanc")
            assert pacs.find_study(study.study_uid) is not None

            health = requests.get(f"{node.web}/healthz", timeout=10).json()
            assert health["status"] == "ok" and health["scp_listening"], health
            metrics = requests.get(f"{node.web}/metrics", timeout=10).text
            assert f"dicom_node_instances_received_total {len(files)}.0" in metrics
            web = logged_in(node.web)
            dashboard = web.get(f"{node.web}/", timeout=10)
            assert dashboard.status_code == 200 and "DICOM_NODE" in dashboard.text
            page = web.get(f"{node.web}/studies/{study.study_uid}", timeout=10)
            assert page.status_code == 200 and study.series[0].series_uid in page.text
            api = web.get(f"{node.web}/api/studies/{study.study_uid}", timeout=10)
            assert api.status_code == 200, api.text[-500:]
            assert [s["series_uid"] for s in api.json()["series"]] == [study.series[0].series_uid]
        finally:
            code = node.stop()
    assert code == 0, node.stderr[-3000:]
    assert "Traceback" not in node.stderr, node.stderr[-3000:]
    assert (tmp_path / "model-side-imports.txt").read_text() == ""


def test_workers_asked_for_without_torch_stop_the_start_with_the_fix(tmp_path: Path) -> None:
    config = write_settings(tmp_path, worker={"enabled": True, "device": "cpu"})
    proc = dicom_node(config, node_env(tmp_path, "hide"), "serve", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torch is not installed" in proc.stderr
    assert "DICOM_NODE_WORKER__ENABLED=false" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedded_worker_loads_models_in_its_child_only(tmp_path: Path) -> None:
    config = write_settings(
        tmp_path,
        models_file=str(models_file(tmp_path)),
        rules_file=str(rules_file(tmp_path)),
        worker={"enabled": True, "device": "cpu", "poll_interval_s": 0.2},
    )
    node = Serving(config, node_env(tmp_path, "watch"))
    db = Database(f"sqlite:///{tmp_path / 'node' / 'node.db'}")
    try:
        study = generate_study(
            tmp_path / "study", seed=32, phases="P", rows=64, columns=64,
            pixel_spacing_mm=6.0, slices=8,
        )  # fmt: skip
        assert storescu(study.series[0].files, node.settings["port"]).returncode == 0

        def done() -> list[str]:
            with db.session() as s:
                states = [(j.pipeline, j.state, j.last_error) for j in s.scalars(select(Job))]
            failed = [st for st in states if st[1] == "failed"]
            assert not failed, failed
            return [p for p, state, _ in states if state == "done"]

        assert wait_until(done, 180, "the tumour job done by the worker child") == ["tumor"]
    finally:
        db.dispose()
        code = node.stop()
    assert code == 0, node.stderr[-3000:]
    assert (tmp_path / "model-side-imports.txt").read_text() == ""
