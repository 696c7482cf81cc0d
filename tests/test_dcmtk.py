"""DCMTK tools are found even when pynetdicom's look-alike scripts come first on PATH."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from devkit.dcmtk import dcmtk_tool


def test_python_scripts_folder_is_skipped(tmp_path, monkeypatch):
    scripts = Path(sysconfig.get_path("scripts"))
    assert (scripts / "storescu").exists() or (Path(sys.executable).parent / "storescu").exists()
    fake_dcmtk = tmp_path / "bin"
    fake_dcmtk.mkdir()
    tool = fake_dcmtk / "storescu"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scripts}:{fake_dcmtk}")
    assert dcmtk_tool("storescu") == str(tool)


def test_real_dcmtk_is_found():
    path = dcmtk_tool("storescu")
    assert path is not None and not path.startswith(sysconfig.get_path("scripts"))
    assert dcmtk_tool("no-such-dcmtk-tool") is None
