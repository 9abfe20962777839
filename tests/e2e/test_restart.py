"""Nothing lost: pending requests and approvals survive a restart of the ext_authz server.

Run against both stores; the server is stopped with SIGTERM (it drains and exits 0) and
started again on the same store.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime

import grpc
import pytest

import policy
from policy import GrantSet, RequestState
from policy.stores import open_store
from tests.e2e.conftest import CONTRIB, ENGINEER, cast_grants
from tests.support.gateway_harness import ACCOUNTS, GatewayStack

pytestmark = [pytest.mark.envoy]

READ = f"/{ACCOUNTS}/ReadAccount"


def _request_id(result) -> str:
    assert result.code is grpc.StatusCode.PERMISSION_DENIED, result.render()
    assert result.request_url, result.render()
    return result.request_url.rsplit("/", 1)[1]


def _survives_restart(workdir, store_url: str) -> None:
    with GatewayStack(workdir, store_url=store_url, grants=cast_grants()) as gw:
        rid = _request_id(gw.call(READ, as_=ENGINEER))
        gw.restart_extauthz()
        # The pending request is still there and is reused, not duplicated.
        assert _request_id(gw.call(READ, as_=ENGINEER)) == rid
        store = open_store(store_url)
        try:
            grants = GrantSet(store.list_grants())
            store.update_request(rid, lambda r: policy.approve(r, CONTRIB, grants, datetime.now(UTC)),
                                 actor=CONTRIB, kind="request.approved")
            gw.restart_extauthz()
            ok = gw.call(READ, as_=ENGINEER)
            assert ok.code is grpc.StatusCode.OK, ok.render()
            assert json.loads(ok.replies[0]["message"])["metadata"]["x-rpcauthz-approval"] == rid
            r = store.get_request(rid)
            assert r.state is RequestState.APPROVED and r.uses == 1
        finally:
            store.close()
        assert "extauthz: stopped" in gw.extauthz.output()


def test_survives_restart_sqlite(tmp_path):
    _survives_restart(tmp_path, f"sqlite:///{tmp_path / 'store.db'}")


@pytest.mark.postgres
def test_survives_restart_postgres(tmp_path, pg_dsn):
    _survives_restart(tmp_path, pg_dsn)
