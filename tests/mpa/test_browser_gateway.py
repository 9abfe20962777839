"""The full loop through real Envoy in headless Chromium: refused with a link, approved on the
page by another engineer, the retry passes."""
from __future__ import annotations

import pathlib

import pytest

ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.envoy]


def test_denied_call_link_approved_in_browser_then_retry_passes(tmp_path, chromium):
    """A's call through real Envoy is refused with a link; A gives the reason on the page; B opens
    the same link, signs in and approves; A's retry through Envoy passes."""
    import grpc

    from devstack.demo_approvals import start_demo_approvals
    from policy import Grant, Role
    from tests.conftest import free_port
    from tests.support.gateway_harness import ACCOUNTS, GatewayStack

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    grants = [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)]
    rpc = f"/{ACCOUNTS}/ReadAccount"  # ENGINEERS_WITH_APPROVAL
    with GatewayStack(tmp_path, store_url=store_url, grants=grants,
                      extauthz={"approvals.base_url": base}) as gw, \
            start_demo_approvals(store_url, gw.issuer, gw.jwks.url, port=port) as approvals:
        first = gw.call(rpc, as_="alice")
        assert first.code is grpc.StatusCode.PERMISSION_DENIED
        link = first.request_url
        assert link and link.startswith(f"{base}/requests/") and link in first.message

        def sign_in(who: str):
            context = chromium.new_context()
            page = context.new_page()
            page.goto(link)
            page.click("#login-link")
            page.fill("#username", who)
            page.click("#login")
            page.wait_for_url(link)
            return context, page

        a_ctx, a_page = sign_in("alice")
        assert "give a reason" in a_page.content() or "reason-in" in a_page.content()
        a_page.fill("#reason-in", "customer asked why their balance is off")
        a_page.click("text=Send to reviewers")
        a_page.wait_for_url(f"{link}?done=completed")
        a_ctx.close()

        b_ctx, b_page = sign_in("bob")
        assert b_page.inner_text("#requester") == "alice"
        assert b_page.inner_text("#reason") == "customer asked why their balance is off"
        b_page.click("#approve")
        b_page.wait_for_url(f"{link}?done=approved")
        assert b_page.inner_text("#state") == "APPROVED"
        ARTIFACTS.mkdir(exist_ok=True)
        b_page.screenshot(path=str(ARTIFACTS / "approval-page-gateway.png"), full_page=True)
        b_ctx.close()

        again = gw.call(rpc, as_="alice")
        assert again.code is grpc.StatusCode.OK, again.message
        request_id = link.rsplit("/", 1)[1]
        assert approvals.store.get_request(request_id).approvers == ("bob",)
