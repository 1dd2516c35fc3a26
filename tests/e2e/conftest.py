"""UI journeys in a real headless browser: Debian's Chromium driven by Playwright (sync API).

No browser download: Playwright launches the Debian package's ``/usr/bin/chromium`` with a fresh
user-data directory per session and the flags a locked-down CI box needs. Screenshots go to
``var/e2e/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "var" / "e2e"
CHROMIUM = Path(os.environ.get("KMPOPS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser_context(stack: Any) -> Iterator[Any]:
    """One Chromium with a fresh profile per module; closed (and the profile removed) after, so
    Playwright's event loop never outlives the journeys."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run ./infra/install-debs.sh chromium (make test does)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="kmpops-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            context.set_default_timeout(30_000)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """A new tab, closed after the test."""
    tab = browser_context.new_page()
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where the journeys leave their screenshots."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
