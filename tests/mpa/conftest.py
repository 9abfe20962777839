"""Fixtures for the approvals tests."""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("RPCAUTHZ_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def chromium():
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and Chromium is missing at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()
