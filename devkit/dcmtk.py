"""Finding DCMTK's command-line tools.

pynetdicom (3.x) installs console scripts with DCMTK's names (``storescu``, ``echoscu``,
``storescp``, ...) into the virtualenv's ``bin``. Those are Python re-implementations with
different options, and with the virtualenv first on PATH they shadow DCMTK. Every place
that means DCMTK asks here, which skips the Python environment's scripts folder.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path


def _python_scripts_dirs() -> set[Path]:
    dirs = set()
    for scheme_path in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if scheme_path:
            dirs.add(Path(scheme_path).absolute())
    return dirs


def dcmtk_tool(name: str) -> str | None:
    """Absolute path of DCMTK's ``name`` on PATH (not pynetdicom's look-alike), or None."""
    skip = _python_scripts_dirs()
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not entry or Path(entry).absolute() in skip:
            continue
        candidate = Path(entry) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None
