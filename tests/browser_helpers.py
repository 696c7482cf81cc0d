"""Headless Chromium for the web tests: launch, log in, screenshots, layout checks.

Screenshots go to ``test-artifacts/`` (git-ignored) or ``$DICOM_NODE_TEST_ARTIFACTS``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.web_helpers import PASSWORD

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("DICOM_NODE_TEST_ARTIFACTS") or REPO / "test-artifacts")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


def launch(pw: Any) -> Any:
    """The system Chromium, headless; fails (never skips) when it is missing."""
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.fail("chromium is not installed (apt-get install chromium)")
    return pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)


def login(page: Any, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def shot(page: Any, name: str) -> Path:
    """A full-page screenshot kept as a test artefact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def page_width_overflow(page: Any) -> int:
    """How many CSS pixels the page is wider than the viewport (0 = no horizontal scroll)."""
    return int(
        page.evaluate(
            "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
            " - window.innerWidth"
        )
    )
