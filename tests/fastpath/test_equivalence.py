"""Equivalence: random grants and callers through three real gateways, the fast path off, on,
and on with its policy in 4 shards (alice, bob and carol in three of them), must give every
call the same outcome: the same gRPC status, the same words for a refusal, and for an allow
the same principal header at the upstream. The modes
are the demo services' own (all five, a service default, and the configured default for an
unannotated method); grants include ones expiring within the fast path's horizon."""
from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import Grant, Role
from policy.stores import open_store
from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

PEOPLE = ["alice", "bob", "carol"]
PATHS = [f"/{ACCOUNTS}/ListAccounts", f"/{ACCOUNTS}/UpdateLimits", f"/{ACCOUNTS}/ReadAccount",
         f"/{ACCOUNTS}/Ping", f"/{ACCOUNTS}/EraseCustomerData", f"/{LEDGER}/GetBalance",
         f"/{LEDGER}/PostEntry"]
EXTRA = {"default_mode": "ENGINEERS_WITHOUT_APPROVAL", "grants_poll_s": 0.05,
         "fast_path.modes_check_s": 0.2, "fast_path.debounce_s": 0.02}
_IDS = re.compile(r"[0-9a-f]{32}|[0-9a-f-]{36}|/r/[A-Za-z0-9_-]+")


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    stacks = []
    try:
        for name, fast, shards in (("slow", False, 1), ("fast", True, 1), ("sharded", True, 4)):
            d = tmp_path_factory.mktemp(name)
            stacks.append(GatewayStack(d, store_url=f"sqlite:///{d}/store.db", fast_path=fast,
                                       extauthz={**EXTRA, "fast_path.shards": shards}).start())
        yield stacks
    finally:
        for s in stacks:
            s.stop()


def _set_grants(gw: GatewayStack, grants: list[Grant]) -> int:
    """Replace the grants; the store's grants revision after the write."""
    store = open_store(gw.store_url)
    try:
        store.replace_grants("manual", grants)
        return store.grants_revision()
    finally:
        store.close()


def _wait_for_the_server(gw: GatewayStack, revision: int) -> None:
    """Until the server decides with grants at ``revision`` or later."""
    deadline = time.monotonic() + 10
    while True:
        held = gw.server_stat("grant_cache", "revision")
        if held is not None and held >= revision:
            return
        assert time.monotonic() < deadline, "the server never loaded the new grants"
        time.sleep(0.02)


def _outcome(gw: GatewayStack, path: str, who: str) -> tuple[object, ...]:
    r = gw.call(path, as_=who)
    if r.code is grpc.StatusCode.OK:
        return (r.code, json.loads(r.replies[0]["message"])["metadata"].get("x-rpcauthz-principal"))
    return (r.code, _IDS.sub("<id>", r.message))


GRANT = st.tuples(st.sampled_from(PEOPLE),
                  st.sampled_from([(Role.ENGINEER, None), (Role.CONTRIBUTOR, ACCOUNTS),
                                   (Role.CONTRIBUTOR, LEDGER)]),
                  st.sampled_from([None, None, None, -60, 2, 3600]))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(GRANT, max_size=7), st.lists(st.tuples(st.sampled_from(PEOPLE), st.sampled_from(PATHS)),
                                             min_size=4, max_size=10))
def test_fast_path_on_and_off_give_every_call_the_same_outcome(gateways, grants, calls) -> None:
    slow, *fast_ones = gateways
    now = datetime.now(UTC)
    chosen = {}
    for who, (role, service), expires in grants:
        chosen[(who, role, service)] = Grant(who, role, service,
                                             None if expires is None else now + timedelta(seconds=expires))
    _wait_for_the_server(slow, _set_grants(slow, list(chosen.values())))
    # Not a sleep for "a push": Envoy's ACKed version says which grants it was compiled from
    # (a recompile of the old grants near a grant's expiry can land meanwhile; it does not count).
    for fast in fast_ones:
        fast.wait_fast_path_grants(_set_grants(fast, list(chosen.values())))
    for who, path in calls:
        expected = _outcome(slow, path, who)
        for fast in fast_ones:
            assert _outcome(fast, path, who) == expected, (fast.workdir.name, who, path, list(chosen.values()))


def test_the_fast_path_answered_some_of_those_calls(gateways) -> None:
    """(Runs after the property.) Equivalence is only worth something if Envoy decided some."""
    _slow, *fast_ones = gateways
    for fast in fast_ones:
        assert fast.envoy is not None
        allowed = fast.envoy.stats("http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed")
        assert sum(int(v) for v in allowed.values()) >= 5, (fast.workdir.name, allowed)
