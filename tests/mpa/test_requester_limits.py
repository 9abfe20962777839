"""A requester's own limits bind through real Envoy (issue 10, finding 1).

The gateway opens a request on a refused call; the requester then asks with ``mpa request rpc
... --max-uses 1`` or ``--duration 3s``. The request must carry those narrower limits (never
the gateway's wider defaults), the approver must see them, and the gateway must enforce them.
"""
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


def mpa(server: str, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    env.update(MPA_SERVER=server, MPA_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def approve(base: str, token: str, request_id: str) -> None:
    resp = httpx.post(f"{base}/api/v1/requests/{request_id}/approve",
                      headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "approved"


def test_requester_limits_narrow_the_gateway_request_and_bind(tmp_path):
    import grpc

    from tests.support.gateway_harness import READ_ACCOUNT as rpc
    from tests.support.gateway_harness import gateway_with_approvals

    with gateway_with_approvals(tmp_path) as (gw, approvals, base):
        erin, alice = gw.token("erin"), gw.token("alice")

        # --- uses: the gateway's request allows any number of calls; erin asks for one.
        first = gw.call(rpc, as_="erin")
        assert first.code is grpc.StatusCode.PERMISSION_DENIED, first.message
        rid = first.request_url.rsplit("/", 1)[1]
        assert approvals.store.get_request(rid).max_uses is None
        res = mpa(base, erin, "request", "rpc", rpc, "--reason", "erase account A-7 only",
                  "--max-uses", "1", "--duration", "10m")
        assert res.returncode == 0, res.stderr
        assert rid in res.stdout
        # what the approver reads
        shown = mpa(base, alice, "show", rid)
        assert "approval lasts 10m; at most 1 call (0 used)" in shown.stdout, shown.stdout
        r = approvals.store.get_request(rid)
        assert (r.max_uses, r.approval_ttl.total_seconds()) == (1, 600)
        approve(base, alice, rid)
        assert gw.call(rpc, as_="erin").code is grpc.StatusCode.OK
        second = gw.call(rpc, as_="erin")
        assert second.code is grpc.StatusCode.PERMISSION_DENIED, second.message
        assert approvals.store.get_request(rid).uses == 1

        # --- duration: the refused call opened a new request; erin asks for 3 seconds.
        rid2 = second.request_url.rsplit("/", 1)[1]
        assert rid2 != rid
        res = mpa(base, erin, "request", "rpc", rpc, "--reason", "look at account A-7 again",
                  "--duration", "3s")
        assert res.returncode == 0, res.stderr
        assert approvals.store.get_request(rid2).approval_ttl.total_seconds() == 3
        approve(base, alice, rid2)
        assert gw.call(rpc, as_="erin").code is grpc.StatusCode.OK
        time.sleep(4)
        late = gw.call(rpc, as_="erin")
        assert late.code is grpc.StatusCode.PERMISSION_DENIED, late.message
