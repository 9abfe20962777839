"""The approval page in real headless Chromium (Debian's /usr/bin/chromium via Playwright)."""
from __future__ import annotations

import pathlib

import pytest

from tests.support.approvals_env import LEDGER, approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
A, B = "alice@example.com", "bob@example.com"

pytestmark = pytest.mark.browser


def test_reviewer_opens_link_signs_in_and_approves(tmp_path, chromium):
    with approvals_env(tmp_path) as env:
        made = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}).json()
        link = made["url"]
        page = chromium.new_page()
        try:
            page.goto(link)
            assert "Sign in required" in page.content()
            page.click("#login-link")
            assert "DEVELOPMENT ONLY" in page.content()
            page.fill("#username", B)
            page.click("#login")
            page.wait_for_url(link)
            assert page.inner_text("#requester") == A
            assert page.inner_text("#reason") == "refund for ticket 4411"
            assert page.inner_text("#state") == "PENDING"  # shown upper-case by CSS
            page.click("#approve")
            page.wait_for_url(f"{link}?done=approved")
            assert page.inner_text("#state") == "APPROVED"
            assert B in page.inner_text("#approvals")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "approval-page.png"), full_page=True)
        finally:
            page.close()
        r = env.store.get_request(made["id"])
        assert r.state.value == "approved" and r.approvers == (B,)
    assert (ARTIFACTS / "approval-page.png").stat().st_size > 10_000

