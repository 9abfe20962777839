"""A grant added or removed in the store reaches the gateway's decisions within seconds."""
from __future__ import annotations

import time

import grpc
import pytest

from policy import Grant, Role
from policy.stores import open_store
from tests.support.gateway_harness import ACCOUNTS

pytestmark = [pytest.mark.envoy]


def _wait_for(gw, who: str, code: grpc.StatusCode, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while True:
        r = gw.call(f"/{ACCOUNTS}/ListAccounts", as_=who)
        if r.code is code:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, r.render()
        time.sleep(0.1)


def test_grant_added_then_removed(sqlite_gateway):
    who = "newcomer"
    first = sqlite_gateway.call(f"/{ACCOUNTS}/ListAccounts", as_=who)
    assert first.code is grpc.StatusCode.PERMISSION_DENIED and "principal.not_engineer" in first.message
    store = open_store(sqlite_gateway.store_url)
    try:
        store.put_grant(Grant(who, Role.ENGINEER))
        _wait_for(sqlite_gateway, who, grpc.StatusCode.OK)
        assert store.delete_grant(who, Role.ENGINEER.value)
        _wait_for(sqlite_gateway, who, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        store.close()
