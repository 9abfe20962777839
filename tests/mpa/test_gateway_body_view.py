"""The call shown for gateway-opened, body-bound requests (issue 10, finding 3): after an
approval-required call through real Envoy, the request the gateway opened carries the call
decoded with the method's input type from reflection, ``[debug_redact = true]`` fields masked,
and the approvals API and page show it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.envoy]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _wait_for_view(base: str, token: str, request_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = httpx.get(f"{base}/api/v1/requests/{request_id}", timeout=15,
                        headers={"Authorization": f"Bearer {token}"})
        assert got.status_code == 200, got.text
        body = got.json()
        if body.get("body_view") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_gateway_keeps_the_decoded_redacted_call_of_a_bound_request(tmp_path):
    import grpc

    from tests.support.gateway_harness import READ_ACCOUNT as rpc
    from tests.support.gateway_harness import gateway_with_approvals

    bind = {"approvals.bind_to_body_modes": ["ENGINEERS_WITH_APPROVAL"]}
    with gateway_with_approvals(tmp_path, extauthz=bind) as (gw, _approvals, base):
        alice = gw.token("alice")
        data = {"accountId": "A-7", "note": "refund", "customerEmail": "a7@example.com"}
        first = gw.call(rpc, as_="erin", data=data)
        assert first.code is grpc.StatusCode.PERMISSION_DENIED, first.render()
        request_id = first.request_url.rsplit("/", 1)[1]
        shown = _wait_for_view(base, alice, request_id)
        assert shown["body_sha256"] and shown["origin"] == "gateway"
        view = shown["body_view"]
        assert view, shown
        assert view.startswith("rpcauthz.demo.v1.AccountRequest {")
        assert '"accountId": "A-7"' in view and '"note": "refund"' in view
        assert '"customerEmail": "[REDACTED]"' in view and "a7@example.com" not in view
        page = httpx.get(f"{base}/requests/{request_id}", timeout=15,
                         headers={"Authorization": f"Bearer {alice}"})
        assert 'id="body-view"' in page.text and "&#34;accountId&#34;: &#34;A-7&#34;" in page.text
        assert "a7@example.com" not in page.text
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
        env.update(MPA_SERVER=base, MPA_TOKEN=alice)
        cli = subprocess.run([sys.executable, "-m", "mpa.cli", "show", request_id], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "the call" in cli.stdout and '"customerEmail": "[REDACTED]"' in cli.stdout
        assert "a7@example.com" not in cli.stdout
        # The same call again reuses the request; the view is kept once, unchanged.
        again = gw.call(rpc, as_="erin", data=data)
        assert again.request_url == first.request_url
        assert _wait_for_view(base, alice, request_id)["body_view"] == view
        # Approve; the bound call then passes (the view changed no decision).
        done = httpx.post(f"{base}/api/v1/requests/{request_id}/complete",
                          json={"reason": "refund for account A-7"}, timeout=15,
                          headers={"Authorization": f"Bearer {gw.token('erin')}"})
        assert done.status_code == 200, done.text
        assert done.json()["body_view"] == view
        resp = httpx.post(f"{base}/api/v1/requests/{request_id}/approve",
                          headers={"Authorization": f"Bearer {alice}"}, timeout=15)
        assert resp.status_code == 200, resp.text
        ok = gw.call(rpc, as_="erin", data=data)
        assert ok.code is grpc.StatusCode.OK, ok.render()


def test_a_body_that_does_not_decode_leaves_no_view_and_changes_no_decision(tmp_path):
    """A body that is not a valid input message: the gateway still opens the bound request
    (approval required, as before), keeps no view and logs why."""
    import grpc

    from policy import Grant, Role
    from policy.stores import open_store
    from tests.support.gateway_harness import ACCOUNTS, GatewayStack

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    grants = [Grant("erin", Role.ENGINEER)]
    with GatewayStack(tmp_path, store_url=store_url, grants=grants,
                      extauthz={"approvals.base_url": "http://approvals.test",
                                "approvals.bind_to_body_modes": ["ENGINEERS_WITH_APPROVAL"]}) as gw:
        # Field 1 (account_id, a string) sent with wire type varint: does not parse.
        with grpc.insecure_channel(gw.gateway) as channel:
            call = channel.unary_unary(f"/{ACCOUNTS}/ReadAccount")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\x08\x01\x12\x80", timeout=10,
                     metadata=(("authorization", f"Bearer {gw.token('erin')}"),))
        err = refused.value
        assert isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.PERMISSION_DENIED
        md = dict(err.trailing_metadata() or ()) | dict(err.initial_metadata() or ())
        request_id = str(md["x-mpa-request-url"]).rsplit("/", 1)[1]
        time.sleep(2.0)  # give the background decoding its chance to (wrongly) keep a view
        store = open_store(store_url)
        try:
            assert store.get_request(request_id).body_sha256
            assert store.get_body_view(request_id) is None
        finally:
            store.close()


def test_slack_shows_the_decoded_redacted_call_of_a_gateway_opened_request(tmp_path):
    """The new-request Slack message of a body-bound request the gateway opened shows the call
    as the page does: decoded, ``[debug_redact = true]`` masked, escaped, cut to fit Slack."""
    import grpc

    from mpa.slack import CALL_TEXT_CAP
    from tests.support.enclave_broker_slack import SlackStub, wait_for
    from tests.support.gateway_harness import READ_ACCOUNT as rpc
    from tests.support.gateway_harness import gateway_with_approvals

    slack = SlackStub()
    bind = {"approvals.bind_to_body_modes": ["ENGINEERS_WITH_APPROVAL"]}
    hook = {"slack_webhook_url": slack.url, "slack_spool_path": str(tmp_path / "slack-spool.db")}
    try:
        with gateway_with_approvals(tmp_path, extauthz=bind, approvals={"config": hook}) as (gw, _approvals, base):
            alice, erin = gw.token("alice"), gw.token("erin")

            def open_and_announce(data: dict, reason: str) -> str:
                """erin's call is refused; once its view is kept she gives the reason (as on
                the page); returns the text of the "The call" section Slack received."""
                refused = gw.call(rpc, as_="erin", data=data)
                assert refused.code is grpc.StatusCode.PERMISSION_DENIED, refused.render()
                request_id = refused.request_url.rsplit("/", 1)[1]
                assert _wait_for_view(base, alice, request_id)["body_view"]
                done = httpx.post(f"{base}/api/v1/requests/{request_id}/complete", json={"reason": reason},
                                  headers={"Authorization": f"Bearer {erin}"}, timeout=15)
                assert done.status_code == 200, done.text

                def announced() -> list[dict]:
                    return [p["json"] for p in slack.posts
                            if any(request_id in str(b) for b in p["json"]["blocks"])]
                assert wait_for(lambda: bool(announced()), timeout=30), slack.posts
                [message] = announced()
                assert message["blocks"][0]["text"]["text"] == "Approval requested"
                [call] = [b["text"]["text"] for b in message["blocks"]
                          if b["type"] == "section" and b.get("text", {}).get("text", "").startswith("*The call*")]
                assert len(call) <= CALL_TEXT_CAP and call.endswith("```") and call.count("```") == 2
                return call

            call = open_and_announce({"accountId": "A-7", "note": "refund <!channel> ```now```",
                                      "customerEmail": "a7@example.com"}, "refund for account A-7")
            assert "rpcauthz.demo.v1.AccountRequest {" in call and '"accountId": "A-7"' in call
            assert '"customerEmail": "[REDACTED]"' in call
            assert "&lt;!channel&gt;" in call and "<!channel>" not in call  # escaped: pings nobody
            assert "a7@example.com" not in str(slack.posts)

            big = open_and_announce({"accountId": "A-8", "note": "n" * 3500,
                                     "customerEmail": "a8@example.com"}, "refund for account A-8")
            assert '"accountId": "A-8"' in big and "... (cut for Slack: " in big
            assert "a8@example.com" not in str(slack.posts)
    finally:
        slack.close()
