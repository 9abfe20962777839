"""Through real Envoy: when nobody can approve, the refused call's message says so at once."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.envoy]


def test_gateway_says_nobody_can_approve(tmp_path):
    import grpc

    from policy import Grant, Role
    from tests.support.gateway_harness import ACCOUNTS, GatewayStack

    rpc = f"/{ACCOUNTS}/ReadAccount"  # ENGINEERS_WITH_APPROVAL
    with GatewayStack(tmp_path, store_url=f"sqlite:///{tmp_path / 'store.db'}",
                      grants=[Grant("erin", Role.ENGINEER)],
                      extauthz={"approvals.base_url": "http://approvals.test"}) as gw:
        alone = gw.call(rpc, as_="erin")
        assert alone.code is grpc.StatusCode.PERMISSION_DENIED
        assert "Nobody can approve this request now: no engineer other than you" in alone.message
        assert alone.request_url.startswith("http://approvals.test/requests/")
        from policy.stores import open_store
        store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        try:
            store.put_grant(Grant("alice", Role.ENGINEER))
        finally:
            store.close()
        import time
        deadline = time.monotonic() + 20
        while True:  # the server picks the grant up by polling the store
            again = gw.call(rpc, as_="erin")
            if "Nobody can approve" not in again.message or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "Nobody can approve" not in again.message
        assert "ask another engineer to approve" in again.message
