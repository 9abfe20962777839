"""Per-mode body binding for gateway-opened requests (issue 10, finding 3's config part):
`approvals.bind_to_body_modes` scopes requests in the listed modes to the call's body, through
real Envoy, and leaves the other modes' requests unbound."""
from __future__ import annotations

import hashlib

import pytest

pytestmark = [pytest.mark.envoy]


def test_bind_to_body_modes_binds_only_listed_modes(tmp_path):
    import grpc

    from policy import Grant, Role
    from policy.stores import open_store
    from rpcauthz.demo.v1 import accounts_pb2
    from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    grants = [Grant("erin", Role.ENGINEER), Grant("erin", Role.CONTRIBUTOR, LEDGER)]
    with GatewayStack(tmp_path, store_url=store_url, grants=grants,
                      extauthz={"approvals.base_url": "http://approvals.test",
                                "approvals.bind_to_body_modes": ["ENGINEERS_WITH_APPROVAL"]}) as gw:
        bound = gw.call(f"/{ACCOUNTS}/ReadAccount", as_="erin", data={"accountId": "A-7"})
        unbound = gw.call(f"/{LEDGER}/PostEntry", as_="erin", data={"ledgerId": "L-1"})
        assert bound.code is unbound.code is grpc.StatusCode.PERMISSION_DENIED
        store = open_store(store_url)
        try:
            r1 = store.get_request(bound.request_url.rsplit("/", 1)[1])
            r2 = store.get_request(unbound.request_url.rsplit("/", 1)[1])
        finally:
            store.close()
        body = accounts_pb2.AccountRequest(account_id="A-7").SerializeToString()
        assert r1.mode.name == "ENGINEERS_WITH_APPROVAL"
        assert r1.body_sha256 == hashlib.sha256(body).hexdigest()
        assert r2.mode.name == "CONTRIBUTORS_WITH_APPROVAL" and r2.body_sha256 is None
