"""The store goes away while the gateway runs: approval-mode calls are UNAVAILABLE, never allowed,
and the gateway recovers when the store comes back. PostgreSQL, reached through a TCP relay
that the test cuts."""
from __future__ import annotations

import grpc
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devstack.processes import free_port
from tests.e2e.conftest import CONTRIB, ENGINEER, cast_grants
from tests.support.gateway_harness import ACCOUNTS, GatewayStack, seed_grants
from tests.support.store_tcp_proxy import TcpProxy

pytestmark = [pytest.mark.envoy, pytest.mark.postgres]


def test_store_down_is_unavailable_then_recovers(tmp_path, pg_dsn):
    params = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432), free_port())
    proxy.start()
    via_proxy = make_conninfo(**{**params, "host": "127.0.0.1", "port": str(proxy.port),
                                 "connect_timeout": "2"})
    seed_grants(pg_dsn, cast_grants())
    try:
        with GatewayStack(tmp_path, store_url=via_proxy) as gw:
            before = gw.call(f"/{ACCOUNTS}/CloseAccount", as_=CONTRIB)
            assert before.code is grpc.StatusCode.PERMISSION_DENIED and before.request_url
            proxy.stop()
            for method in ("CloseAccount", "ReadAccount"):
                r = gw.call(f"/{ACCOUNTS}/{method}", as_=CONTRIB if method == "CloseAccount" else ENGINEER)
                assert r.code is grpc.StatusCode.UNAVAILABLE, r.render()
                assert "store.unavailable" in r.message or "deadline.exceeded" in r.message, r.message
            proxy.start()
            for _ in range(50):
                after = gw.call(f"/{ACCOUNTS}/CloseAccount", as_=CONTRIB)
                if after.code is not grpc.StatusCode.UNAVAILABLE:
                    break
            assert after.code is grpc.StatusCode.PERMISSION_DENIED and after.request_url == before.request_url
    finally:
        proxy.stop()
