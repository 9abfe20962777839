"""The web inbox in real headless Chromium (issue 10, finding 4): a reviewer signs in from
``/login``, lands on the inbox, finds an RPC request and a broker credential request under
"waiting for my approval", opens each and approves it; the requester's inbox lists both under
"my requests". The broker is the real one (gRPC + pinned TLS), its STS a local stand-in."""
from __future__ import annotations

import pathlib

import pytest

from tests.support.approvals_env import LEDGER, approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
A, B = "alice@example.com", "bob@example.com"

pytestmark = pytest.mark.browser


@pytest.fixture
def broker(tmp_path):
    from devstack.devissuer import DevIssuer
    from enclave_bridge.broker.notify import MemoryAuditLog
    from enclave_bridge.broker.server import start_broker
    from enclave_bridge.seeds import SeedBundle
    from mpa.broker_link import BrokerLink
    from tests.support.enclave_broker_env import StubSts, broker_config

    issuer = DevIssuer(tmp_path / "dev-issuer.pem")  # the same key approvals_env signs with
    sts = StubSts()
    config = broker_config(issuer.jwks(), issuer=issuer.issuer, audience=issuer.audience,
                           oidc_issuer="http://127.0.0.1:1")
    runtime = start_broker(config, SeedBundle.generate(), state_path=tmp_path / "broker.db",
                           audit=[MemoryAuditLog()], sts_client=sts.client(),
                           cert_out=tmp_path / "broker.pem")
    try:
        yield issuer, BrokerLink.from_files(f"127.0.0.1:{runtime.port}", tmp_path / "broker.pem")
    finally:
        runtime.close()
        sts.close()


def sign_in(page, base: str, who: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#username", who)
    page.click("#login")
    page.wait_for_url(f"{base}/")


def test_inbox_to_request_to_approve_for_rpc_and_credential(tmp_path, chromium, broker):
    issuer, link = broker
    with approvals_env(tmp_path, broker=link) as env:
        rpc = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}).json()
        from enclave_bridge.broker.client import BrokerClient
        client = BrokerClient(link.target, link.cert_pem, issuer.mint(A))
        cred = client.request_aws("platform-admin", reason="rotate the NAT keys",
                                  duration_seconds=900)
        client.close()
        page = chromium.new_page()
        try:
            # Signing in from a request link returns to that link.
            page.goto(f"{env.url}/credentials/{cred.id}")
            assert "Sign in required" in page.content()
            page.click("#login-link")
            page.fill("#username", B)
            page.click("#login")
            page.wait_for_url(f"{env.url}/credentials/{cred.id}")
            page.click("#inbox-link")
            page.wait_for_url(f"{env.url}/")
            waiting = page.inner_text("#waiting")
            assert f"/{LEDGER}/Adjust" in waiting and "AWS role platform-admin" in waiting
            assert A in waiting and "rotate the NAT keys" in waiting
            assert "Nothing here" in page.inner_text("#mine-empty")

            page.click(f"#waiting a[href='/requests/{rpc['id']}']")
            page.wait_for_url(f"{env.url}/requests/{rpc['id']}")
            page.click("#approve")
            page.wait_for_url(f"{env.url}/requests/{rpc['id']}?done=approved")
            assert page.inner_text("#state") == "APPROVED"

            page.goto(f"{env.url}/")
            page.click(f"#waiting a[href='/credentials/{cred.id}']")
            page.wait_for_url(f"{env.url}/credentials/{cred.id}")
            assert page.inner_text("#requester") == A
            assert page.inner_text("#duration") == "900 seconds"
            assert "engineer other than the requester" in page.inner_text("#approver-rule")
            assert B in page.inner_text("#eligible").split(", ")  # by name, from the broker's grants
            page.click("#approve")
            page.wait_for_url(f"{env.url}/credentials/{cred.id}?done=approved")
            assert page.inner_text("#state") == "APPROVED"
            assert B in page.inner_text("#approvals")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "credential-page.png"), full_page=True)

            page.goto(f"{env.url}/")
            assert "Nothing here" in page.inner_text("#waiting-empty")
        finally:
            page.close()

        # The requester's inbox lists both, approved.
        page = chromium.new_page()
        try:
            sign_in(page, env.url, A)
            mine = page.inner_text("#mine")
            assert f"/{LEDGER}/Adjust" in mine and "AWS role platform-admin" in mine
            assert mine.count("APPROVED") == 2  # upper-case by CSS
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "inbox.png"), full_page=True)
        finally:
            page.close()
        assert env.store.get_request(rpc["id"]).approvers == (B,)
        assert link.get(issuer.mint(A), cred.id).state == "approved"


def test_inbox_needs_sign_in_and_says_when_the_broker_is_down(tmp_path):
    import httpx

    from mpa.broker_link import BrokerLink
    from tests.conftest import free_port



    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    dead = BrokerLink(f"127.0.0.1:{free_port()}", pem, timeout=2.0)

    with approvals_env(tmp_path, broker=dead) as env:
        resp = httpx.get(f"{env.url}/", follow_redirects=False)
        assert resp.status_code == 401 and "/login?next=/" in resp.text
        assert httpx.get(f"{env.url}/requests", follow_redirects=False).headers["location"] == "/"
        resp = env.call("GET", "/", B)
        assert resp.status_code == 200 and "Credential requests are not shown" in resp.text
        assert "unavailable" in resp.text
