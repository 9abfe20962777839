"""The approvals service's audit events while its store is away (issue 9, finding 4).

Unlike the gateway's decisions, every event of the approvals service is written by the store in
the same transaction as the change it records (``create_request``/``update_request``), so there
is nothing to spool: with the store away the change is refused (503 ``store_unavailable``) and no
event exists; once the store is back the retried change is recorded exactly once. Real server,
real PostgreSQL through a TCP relay the test cuts and restores."""
from __future__ import annotations

import time

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devstack.processes import free_port
from policy.stores import open_store
from tests.support.approvals_env import LEDGER, approvals_env
from tests.support.store_tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres]

A, B = "alice@example.com", "bob@example.com"


def test_store_away_refuses_changes_and_each_retried_change_is_audited_once(tmp_path, pg_dsn):
    params = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432), free_port())
    proxy.start()
    via_proxy = make_conninfo(**{**params, "host": "127.0.0.1", "port": str(proxy.port), "connect_timeout": "2"})
    body = {"service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}
    direct = open_store(pg_dsn)
    try:
        with approvals_env(tmp_path, store_url=via_proxy) as env:
            created = env.call("POST", "/api/v1/requests", A, json=body)
            assert created.status_code == 201, created.text
            rid = created.json()["id"]

            proxy.stop()  # the store goes away
            away = env.call("POST", f"/api/v1/requests/{rid}/approve", B, json={"comment": "ok"})
            assert away.status_code == 503, away.text
            assert away.json()["error"]["code"] == "store_unavailable"
            lost = env.call("POST", "/api/v1/requests", A, json={**body, "reason": "while the store is away"})
            assert lost.status_code == 503, lost.text

            proxy.start()  # back: the same approval, retried, is recorded once
            deadline = time.monotonic() + 20
            while True:
                done = env.call("POST", f"/api/v1/requests/{rid}/approve", B, json={"comment": "ok"})
                if done.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert done.status_code == 200, done.text
            assert done.json()["state"] == "approved"
        events = direct.list_audit()
        assert [e.kind for e in events if e.request_id == rid] == ["request.created", "request.approved"]
        assert len({e.id for e in events}) == len(events)
        # The create refused while the store was away left no request and no event.
        assert [e.kind for e in events if e.kind == "request.created"] == ["request.created"]
        assert all(r.reason != "while the store is away" for r in direct.find_requests(requester=A))
    finally:
        direct.close()
        proxy.stop()
