"""The fast path through the whole gateway (real Envoy, the ext_authz server on PostgreSQL with
LISTEN/NOTIFY, the demo services): static allows are answered by Envoy's RBAC filter without
a Check, upstreams see the same principal header, denials and approval modes keep today's
path and messages, a revoked grant stops being a fast allow within a bound, every fast-path
allow is exactly one decision audit event with the policy version that allowed it (Envoy's
access log to the server) while Checks audit the rest as before, and a killed control plane
withdraws the fast path within the TTL (calls then fail closed)."""
from __future__ import annotations

import collections
import json
import re
import signal
import time

import grpc
import pytest

from fastpath.compile import shard_of
from policy import Grant, Role
from policy.stores import open_store
from tests.support.gateway_harness import ACCOUNTS, FAST_PATH_ENVOYS, FAST_PATH_RESUMED, GatewayStack

pytestmark = [pytest.mark.envoy, pytest.mark.postgres, pytest.mark.slow]

LIST = f"/{ACCOUNTS}/ListAccounts"      # ENGINEERS_WITHOUT_APPROVAL
UPDATE = f"/{ACCOUNTS}/UpdateLimits"    # CONTRIBUTORS_WITHOUT_APPROVAL
READ = f"/{ACCOUNTS}/ReadAccount"       # ENGINEERS_WITH_APPROVAL
FAST = "http.engineers_grpc.rbac.rpcauthz_fast_."
CHECKS = "http.engineers_grpc.ext_authz."
TTL = 3.0


def counters(gw: GatewayStack) -> dict[str, int]:
    assert gw.envoy is not None
    s = gw.envoy.stats()
    return {k: int(v) for k, v in s.items()
            if k.startswith((FAST, CHECKS)) and isinstance(v, int)}


def call_counted(gw: GatewayStack, path: str, who: str, **kw):
    """A call, and which path answered it: "fast" (Envoy's RBAC) or "ext_authz"."""
    before = counters(gw)
    r = gw.call(path, as_=who, **kw)
    after = counters(gw)
    fast = after.get(FAST + "shadow_allowed", 0) - before.get(FAST + "shadow_allowed", 0)
    return r, "fast" if fast else "ext_authz"


def until_fast(gw: GatewayStack, path: str, who: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, how = call_counted(gw, path, who)
        if how == "fast":
            return r
        time.sleep(0.1)
    raise TimeoutError(f"{who} {path} never took the fast path")


def audit_events(store_url: str) -> tuple[list, list]:
    """(fast-path allows' events, Checks' decision events) in the store."""
    store = open_store(store_url)
    try:
        events = [e for e in store.list_audit(limit=10_000) if e.kind.startswith("decision.")]
    finally:
        store.close()
    fast = [e for e in events if e.detail.get("rule") == "fast_path.allow"]
    return fast, [e for e in events if e.detail.get("rule") != "fast_path.allow"]


def upstream_metadata(result) -> dict[str, str]:
    return json.loads(result.replies[0]["message"])["metadata"]


@pytest.mark.parametrize(("shards", "delta_xds"), [(1, True), (1, False), (4, True)])
def test_fast_path_through_the_gateway(tmp_path, pg_dsn, shards: int, delta_xds: bool) -> None:
    """Over delta ADS (the default) and state of the world, and with the policy in 4 parts
    (each call decided by the part its verified claim hashes to; alice and bob are in
    different parts)."""
    assert shard_of("alice", 4) != shard_of("bob", 4)
    grants = [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER),
              Grant("bob", Role.CONTRIBUTOR, ACCOUNTS)]
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=grants, fast_path=True, fast_path_delta_xds=delta_xds,
                      extauthz={"fast_path.modes_check_s": 0.2, "fast_path.debounce_s": 0.05,
                                "fast_path.shards": shards}) as gw:
        # The first call learns the mode through ext_authz; soon Envoy answers it alone.
        r = until_fast(gw, LIST, "alice")
        assert r.code is grpc.StatusCode.OK
        meta = upstream_metadata(r)
        assert meta["x-rpcauthz-principal"] == "alice"
        assert meta["x-rpcauthz-decision-id"].startswith("v") and "/engineers" in meta["x-rpcauthz-decision-id"]
        before = counters(gw)
        r, how = call_counted(gw, LIST, "alice")
        assert (r.code, how) == (grpc.StatusCode.OK, "fast")
        assert counters(gw).get(CHECKS + "ok", 0) == before.get(CHECKS + "ok", 0), "ext_authz was asked"

        # Forged decision headers never reach the upstream on the fast path either.
        r, how = call_counted(gw, LIST, "alice", metadata=[("x-rpcauthz-principal", "mallory"),
                                                           ("x-rpcauthz-approval", "forged")])
        assert how == "fast" and r.code is grpc.StatusCode.OK
        meta = upstream_metadata(r)
        assert meta["x-rpcauthz-principal"] == "alice" and "x-rpcauthz-approval" not in meta

        # Denials and approval modes: today's path and words.
        r, how = call_counted(gw, LIST, "carol")
        assert (r.code, how) == (grpc.StatusCode.PERMISSION_DENIED, "ext_authz")
        assert "carol holds no engineer grant" in r.message
        r, how = call_counted(gw, UPDATE, "alice")
        assert (r.code, how) == (grpc.StatusCode.PERMISSION_DENIED, "ext_authz")
        assert "not a contributor" in r.message
        r, how = call_counted(gw, READ, "alice")
        assert (r.code, how) == (grpc.StatusCode.PERMISSION_DENIED, "ext_authz")
        assert r.request_url

        # A contributor's fast allow; the grant is revoked (NOTIFY); the next calls go to
        # ext_authz and are denied, within a bound.
        until_fast(gw, UPDATE, "bob")
        store = open_store(pg_dsn)
        try:
            revoked_at = time.monotonic()
            store.delete_grant("bob", Role.CONTRIBUTOR, ACCOUNTS)
        finally:
            store.close()
        while True:
            r, how = call_counted(gw, UPDATE, "bob")
            lag = time.monotonic() - revoked_at
            if how == "ext_authz":
                break
            assert lag < 5, f"bob's revoked grant still allowed by Envoy after {lag:.2f}s"
            time.sleep(0.02)
        assert r.code is grpc.StatusCode.PERMISSION_DENIED
        print(f"grant revoke -> Envoy (NOTIFY, debounce, compile, ADS push): {lag * 1000:.0f} ms")

        # The audit: N more fast-path calls, then every fast-path allow of the test is exactly
        # one decision.allow event naming the compiled policy (and version) that allowed it,
        # and every call ext_authz saw is audited by its Check, as before.
        n = 6
        for i in range(n):
            r, how = call_counted(gw, LIST, "alice" if i % 2 else "bob")
            assert (r.code, how) == (grpc.StatusCode.OK, "fast")
        fast_allows = counters(gw)[FAST + "shadow_allowed"]
        deadline = time.monotonic() + 15  # Envoy flushes its access log buffer every second
        while len(audit_events(pg_dsn)[0]) < fast_allows and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # one flush more: nothing else may arrive
        fast, checked = audit_events(pg_dsn)
        assert len(fast) == fast_allows, [e.to_json() for e in fast]
        assert len({e.id for e in fast}) == len(fast)
        kinds = collections.Counter()
        for e in fast:
            m = re.fullmatch(r"v(\d+)/(engineers|contributors)", e.detail["policy_id"])
            assert m and e.detail["policy_version"] == m[1], e.to_json()
            assert (e.outcome, e.service) == ("allow", ACCOUNTS)
            kinds[(e.actor, e.method, m[2], e.detail["mode"])] += 1
        assert kinds[("bob", "UpdateLimits", "contributors", "CONTRIBUTORS_WITHOUT_APPROVAL")] >= 1
        assert kinds[("bob", "ListAccounts", "engineers", "ENGINEERS_WITHOUT_APPROVAL")] == n // 2
        assert {who for who, *_ in kinds} == {"alice", "bob"}  # the forged principal header changed nothing
        c = counters(gw)
        assert len(checked) == c.get(CHECKS + "ok", 0) + c.get(CHECKS + "denied", 0)
        assert {e.actor for e in checked} >= {"carol", "alice", "bob"}

        # Envoy's own access log: a call ext_authz decided carries that decision (ext_authz
        # runs inside the composite gate, for calls RBAC did not allow: its metadata must
        # still reach the log); a fast-path allow carries the RBAC policy and no decision.
        deadline = time.monotonic() + 10
        while True:
            lines = gw.access_log_lines()
            checked_read = [ln for ln in lines if ln["path"] == READ]
            fast_lines = [ln for ln in lines if ln.get("fast_path") == "allowed"]
            if (checked_read and fast_lines) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert checked_read and fast_lines, lines
        assert all(ln["outcome"] and re.fullmatch(r"[0-9a-f]{32}", ln["decision_id"]) for ln in checked_read), checked_read
        assert all(ln["fast_path"] != "allowed" for ln in checked_read)
        assert all(ln["fast_path_policy"].startswith("v") and ln["decision_id"] in ("", "-", None)
                   for ln in fast_lines), fast_lines

        # The control plane is killed: within the TTL Envoy drops the fast path, and calls
        # fail closed (ext_authz is gone: UNAVAILABLE), never allowed by a stale policy.
        assert gw.extauthz is not None
        gw.extauthz.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while True:
            r, how = call_counted(gw, LIST, "alice")
            waited = time.monotonic() - killed_at
            if how == "ext_authz":
                break
            assert waited < TTL + 2, f"Envoy still allowed on the fast path {waited:.1f}s after the kill"
            time.sleep(0.1)
        assert r.code is grpc.StatusCode.UNAVAILABLE
        print(f"control plane killed -> fast path withdrawn after {waited:.1f}s (TTL {TTL}s)")


def _without_rbac(cfg: dict) -> dict:
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                hcm["http_filters"] = [h for h in hcm["http_filters"] if h["name"] != "rpcauthz_fast_path"]
    return cfg


def test_no_rbac_result_means_ext_authz_decides(tmp_path, pg_dsn) -> None:
    """ext_authz is skipped only on an "allowed" shadow result: with no RBAC filter to write
    one, every call, even one the fast path would allow, is a Check, and a denial stands."""
    grants = [Grant("alice", Role.ENGINEER)]
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=grants, fast_path=True,
                      envoy_config=_without_rbac) as gw:
        for _ in range(3):
            before = counters(gw)
            r = gw.call(LIST, as_="alice")
            assert r.code is grpc.StatusCode.OK
            assert counters(gw).get(CHECKS + "ok", 0) == before.get(CHECKS + "ok", 0) + 1
        r = gw.call(LIST, as_="carol")
        assert r.code is grpc.StatusCode.PERMISSION_DENIED and "carol holds no engineer grant" in r.message


def test_a_gateway_rendered_for_another_claim_gets_no_policy(tmp_path, pg_dsn) -> None:
    """The server matches the ``sub`` claim; a gateway whose node metadata says it was
    rendered for ``email`` (its principal header would carry another claim than the one the
    policy matched) is sent no policy: every call stays with ext_authz, and /metrics says why."""
    def rendered_for_email(cfg: dict) -> dict:
        cfg["node"]["metadata"]["rpcauthz_fast_path"]["principal_claim"] = "email"
        return cfg

    with GatewayStack(tmp_path, store_url=pg_dsn, grants=[Grant("alice", Role.ENGINEER)], fast_path=True,
                      envoy_config=rendered_for_email,
                      extauthz={"fast_path.modes_check_s": 0.2, "fast_path.debounce_s": 0.05}) as gw:
        deadline = time.monotonic() + 15
        while 'rpcauthz_fast_path_xds_events_total{event="mismatch"} 1.0' not in gw.replica_metrics(0):
            assert time.monotonic() < deadline, "the server never refused the mismatched gateway"
            time.sleep(0.1)
        for _ in range(5):
            r, how = call_counted(gw, LIST, "alice")
            assert (r.code, how) == (grpc.StatusCode.OK, "ext_authz")
            time.sleep(0.3)  # time enough for the mode to be learnt and a policy pushed, were it sent
        assert gw.server_stat("fast_path", "acked_grants_revision") == -1



def test_a_failover_to_another_replica_keeps_envoys_policy(tmp_path, pg_dsn) -> None:
    """Two replicas compile the same policy from the same store and modes: the same labels and
    bytes. The replica serving Envoy's ADS stream is killed; Envoy reconnects to the other and
    says what it holds; that replica renews it (``resume``) instead of sending it again: Envoy
    reloads no part, and alice's calls stay on the fast path throughout."""
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=[Grant("alice", Role.ENGINEER)], fast_path=True,
                      replicas=2, extauthz={"fast_path.shards": 4, "fast_path.ttl_s": 10,
                                            "fast_path.modes_check_s": 0.2}) as gw:
        assert gw.envoy is not None
        # Checks (an approval mode: always ext_authz) spread over both replicas, so both learn
        # the service's modes and compile it in.
        deadline = time.monotonic() + 20
        while not all(gw.replica_sample(i, "rpcauthz_fast_path_policy_bytes") > 0
                      and "rpcauthz_decisions_total{" in gw.replica_metrics(i) for i in (0, 1)):
            assert time.monotonic() < deadline, "the replicas never both compiled a policy"
            gw.call(READ, as_="alice")
        until_fast(gw, LIST, "alice")
        deadline = time.monotonic() + 20
        while len({gw.replica_sample(i, "rpcauthz_fast_path_policy_bytes") for i in (0, 1)}) != 1:
            assert time.monotonic() < deadline, "the replicas' policies never came to the same size"
            gw.call(READ, as_="alice")
            time.sleep(0.2)
        serving = gw.ads_replica()
        other = 1 - serving
        reloads = gw.fast_path_reloads()
        assert len(reloads) == 4 and all(v >= 1 for v in reloads.values()), reloads

        proc = gw.replicas[serving]
        assert proc is not None
        proc.signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while gw.replica_sample(other, FAST_PATH_ENVOYS) != 1:
            assert time.monotonic() < deadline, "Envoy never reconnected to the other replica"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while gw.replica_sample(other, FAST_PATH_RESUMED) < 1:
            assert time.monotonic() < deadline, gw.replica_metrics(other)
            time.sleep(0.1)
        for _ in range(5):
            r, how = call_counted(gw, LIST, "alice")
            assert (r.code, how) == (grpc.StatusCode.OK, "fast")
        assert gw.fast_path_reloads() == reloads  # renewed from the other replica, nothing reloaded


@pytest.mark.parametrize("named_in", ["contributor grant", "static endpoints only"])
def test_a_restarted_server_renews_envoys_policy(tmp_path, pg_dsn, named_in) -> None:
    """The server restarts (SIGTERM, start on the same port and store). Before its first
    policy it learns the modes of the services named in contributor grants or in the static
    reflection endpoints (``fast_path.warm_s``; here Accounts is named in a grant, or only in
    the endpoints) and answers no Envoy meanwhile, so its first policy is the one Envoy holds
    (same labels, same bytes): renewed (``resume``), not resent, no part reloaded, and alice's
    calls stay on the fast path across the restart."""
    grants = [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)]
    if named_in == "contributor grant":
        grants.append(Grant("bob", Role.CONTRIBUTOR, ACCOUNTS))
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=grants, fast_path=True,
                      extauthz={"fast_path.shards": 4, "fast_path.ttl_s": 10}) as gw:
        until_fast(gw, LIST, "alice")
        reloads = gw.fast_path_reloads()
        assert len(reloads) == 4 and all(v >= 1 for v in reloads.values()), reloads
        gw.restart_extauthz()
        deadline = time.monotonic() + 20
        while gw.replica_sample(0, FAST_PATH_RESUMED) < 1:
            assert time.monotonic() < deadline, gw.extauthz.output()[-3000:] if gw.extauthz else ""
            time.sleep(0.1)
        assert gw.fast_path_reloads() == reloads
        for _ in range(3):
            r, how = call_counted(gw, LIST, "alice")
            assert (r.code, how) == (grpc.StatusCode.OK, "fast")
