"""Pre-approval (issue 10, finding 2): `mpa request rpc METHOD --body JSON` before the first call,
against an approvals server given reflection like the gateway's; the approval binds that exact
message, so through real Envoy the same call passes and another body is refused."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import httpx
import pytest

pytestmark = [pytest.mark.envoy]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def mpa(server: str, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    env.update(MPA_SERVER=server, MPA_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_request_with_body_before_the_first_call_binds_that_message(tmp_path):
    import grpc

    from tests.support.gateway_harness import READ_ACCOUNT as rpc  # ENGINEERS_WITH_APPROVAL
    from tests.support.gateway_harness import gateway_with_approvals

    with gateway_with_approvals(tmp_path) as (gw, approvals, base):
        erin, alice = gw.token("erin"), gw.token("alice")
        res = mpa(base, erin, "request", "rpc", rpc, "--reason", "look at account A-7 only",
                  "--body", '{"accountId": "A-7", "note": "refund", '
                            '"customerEmail": "a7@example.com"}', "--json")
        assert res.returncode == 0, res.stderr
        made = json.loads(res.stdout)
        assert made["origin"] == "user" and made["body_sha256"]
        assert made["mode"] == "ENGINEERS_WITH_APPROVAL"  # learned through reflection
        # The approver sees the call decoded, personal data masked: API, CLI, page.
        view = made["body_view"]
        assert view.startswith("rpcauthz.demo.v1.AccountRequest {")
        assert '"accountId": "A-7"' in view and '"customerEmail": "[REDACTED]"' in view
        assert "a7@example.com" not in view
        shown = mpa(base, alice, "show", made["id"])
        assert "the call" in shown.stdout and "[REDACTED]" in shown.stdout
        assert "a7@example.com" not in shown.stdout
        page = httpx.get(f"{base}/requests/{made['id']}", timeout=15,
                         headers={"Authorization": f"Bearer {alice}"})
        assert 'id="body-view"' in page.text and "&#34;accountId&#34;: &#34;A-7&#34;" in page.text
        assert "a7@example.com" not in page.text
        bad = mpa(base, erin, "request", "rpc", rpc, "--reason", "look at account A-7 only",
                  "--body", '{"acount": "A-7"}')
        assert bad.returncode == 1 and "not a valid rpcauthz.demo.v1.AccountRequest" in bad.stderr
        resp = httpx.post(f"{base}/api/v1/requests/{made['id']}/approve",
                          headers={"Authorization": f"Bearer {alice}"}, timeout=15)
        assert resp.status_code == 200, resp.text
        other = gw.call(rpc, as_="erin", data={"accountId": "A-8", "note": "refund"})
        assert other.code is grpc.StatusCode.PERMISSION_DENIED
        same = gw.call(rpc, as_="erin", data={"accountId": "A-7", "note": "refund",
                                              "customerEmail": "a7@example.com"})
        assert same.code is grpc.StatusCode.OK, same.render()
        assert approvals.store.get_request(made["id"]).uses == 1
