"""Each Check is recorded exactly once, however it ends, and looks its mode up once.

A real reflection cache against the real demo service (reflection over gRPC), the real
SQLite store and audit writer, and the server's own Prometheus registry: every check must
leave exactly one ``decision.*`` audit event, one ``rpcauthz_decisions_total`` increment,
one latency observation and at most one reflection-cache lookup (hit or miss), so the hit
ratio operators watch is not skewed by approval modes.
"""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format, struct_pb2

import policy
from devstack.demo_services import start_demo_server
from extauthz.audit_writer import AuditWriter
from extauthz.config import load_settings
from extauthz.metrics import Metrics
from extauthz.pipeline import Authorizer
from policy import Grant, GrantSet, Role
from policy.stores import open_store
from reflection_cache.cache import CacheSettings, ReflectionCache
from reflection_cache.endpoints import EndpointResolver
from tests.support.extauthz_doubles import FixedGrants

SVC = "rpcauthz.demo.v1.Accounts"
DOWN = "rpcauthz.demo.v1.Nowhere"
GRANTS = GrantSet([
    Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER),
    Grant("sec1", Role.ENGINEER), Grant("sec1", Role.SECURITY_ONCALL),
    Grant("sec2", Role.ENGINEER), Grant("sec2", Role.SECURITY_ONCALL),
])
LOOKUPS = ("hits", "misses", "stale_serves", "negative_hits")


class Gateway:
    def __init__(self, address: str, dead_address: str) -> None:
        self.settings = load_settings(env={}, overrides={"store_url": "memory:"})
        self.store = open_store("sqlite:///:memory:")
        self.metrics = Metrics()
        self.audit = AuditWriter(self.store, self.metrics, 1000)
        self.cache = ReflectionCache(EndpointResolver(static={SVC: address, DOWN: dead_address}),
                                     CacheSettings(ttl=60, stale_window=30, negative_ttl=5, deadline=0.5))
        self.authorizer = Authorizer(self.settings, store=self.store, grants=FixedGrants(GRANTS),
                                     modes=self.cache, audit=self.audit, metrics=self.metrics)

    def lookups(self) -> int:
        stats = self.cache.stats()
        return sum(int(stats.get(k, 0)) for k in LOOKUPS)

    def decisions(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect() if m.name == "rpcauthz_decisions"
                   for s in m.samples if s.name == "rpcauthz_decisions_total")

    def observations(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect() if m.name == "rpcauthz_decision_seconds"
                   for s in m.samples if s.name == "rpcauthz_decision_seconds_count")

    async def check(self, path: str, principal: str | None, dry_run: bool = False
                    ) -> external_auth_pb2.CheckResponse:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.path, http.method = path, "POST"
        if dry_run:
            req.attributes.context_extensions["dry_run"] = "true"
        if principal is not None:
            payload = struct_pb2.Struct()
            payload.update({"jwt_payload": {"sub": principal, "iss": "x"}})
            req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
        return await self.authorizer.check(req)

    def decision_events(self, decision_id: str) -> list[str]:
        """Audit kinds of ``decision.*`` events about one decision (the store's own
        ``decision.allow_with_approval`` names the decision in its reason)."""
        return [e.kind for e in self.store.list_audit()
                if e.kind.startswith("decision.")
                and ((e.detail or {}).get("decision_id") == decision_id or decision_id in (e.reason or ""))]


@pytest.fixture
async def gw():
    from devstack.processes import free_port

    server = start_demo_server(services=("accounts",))
    g = Gateway(server.address, f"127.0.0.1:{free_port()}")
    g.audit.start()
    try:
        yield g
    finally:
        await g.audit.close()
        await g.cache.close()
        g.store.close()
        server.stop(grace=0)


def _decision_id(resp: external_auth_pb2.CheckResponse) -> str:
    return json_format.MessageToDict(resp.dynamic_metadata)["decision_id"]


async def _flush(g: Gateway) -> None:
    await g.audit.close()  # writes everything queued; a new writer keeps serving
    g.audit = g.authorizer.audit = AuditWriter(g.store, g.metrics, 1000)
    g.audit.start()


@pytest.mark.parametrize("path, principal, dry_run, outcome, lookups", [
    (f"/{SVC}/ListAccounts", "alice", False, "allow", 1),
    (f"/{SVC}/ListAccounts", "nobody", False, "deny", 1),
    (f"/{SVC}/UpdateLimits", "alice", True, "allow", 1),           # dry-run: would_deny
    (f"/{SVC}/ReadAccount", "alice", False, "approval_required", 1),
    (f"/{SVC}/ReadAccount", "alice", True, "allow", 1),            # dry-run: would_need_approval
    (f"/{SVC}/EraseCustomerData", "sec1", False, "approval_required", 1),
    (f"/{SVC}/NoSuchMethod", "alice", False, "deny", 1),
    (f"/{DOWN}/Anything", "alice", False, "error", 1),             # reflection unreachable
    (f"/{SVC}/ListAccounts", None, False, "deny", 0),               # no identity: no lookup
])
async def test_every_check_is_audited_counted_and_looked_up_once(gw, path, principal, dry_run,
                                                                 outcome, lookups):
    if lookups:  # warm the cache first, so the counted check is a hit (or a remembered error)
        await gw.check(path, principal)
    before = (gw.lookups(), gw.decisions(), gw.observations())
    resp = await gw.check(path, principal, dry_run)
    after = (gw.lookups(), gw.decisions(), gw.observations())
    assert json_format.MessageToDict(resp.dynamic_metadata)["outcome"] == outcome
    assert after[0] - before[0] == lookups, "reflection-cache lookups for one check"
    assert after[1] - before[1] == 1, "rpcauthz_decisions_total increments for one check"
    assert after[2] - before[2] == 1, "latency observations for one check"
    await _flush(gw)
    assert len(gw.decision_events(_decision_id(resp))) == 1, gw.decision_events(_decision_id(resp))


async def test_cold_approval_mode_check_counts_one_miss_and_nothing_else(gw):
    await gw.check(f"/{SVC}/ReadAccount", "alice")
    stats = gw.cache.stats()
    assert (stats["misses"], stats["hits"]) == (1, 0)
    await gw.check(f"/{SVC}/ReadAccount", "alice")
    stats = gw.cache.stats()
    assert (stats["misses"], stats["hits"]) == (1, 1)


async def test_allow_through_approval_is_audited_once_and_break_glass_use_raised(gw):
    first = await gw.check(f"/{SVC}/EraseCustomerData", "sec1")
    request_id = json_format.MessageToDict(first.dynamic_metadata)["request_id"]
    now = datetime.now(UTC)
    gw.store.update_request(request_id, lambda r: policy.complete(r, "sec1", now, reason="fix",
                                                                  incident="INC-1"),
                            actor="sec1", kind="request.completed")
    gw.store.update_request(request_id, lambda r: policy.approve(r, "sec2", GRANTS, now),
                            actor="sec2", kind="request.approved")
    before = (gw.lookups(), gw.decisions())
    resp = await gw.check(f"/{SVC}/EraseCustomerData", "sec1")
    assert resp.status.code == 0
    assert (gw.lookups() - before[0], gw.decisions() - before[1]) == (1, 1)
    await _flush(gw)
    decision_id = _decision_id(resp)
    assert gw.decision_events(decision_id) == ["decision.allow_with_approval"]
    used = [e for e in gw.store.list_audit(kinds=["break_glass.used"])
            if (e.detail or {}).get("decision_id") == decision_id]
    assert len(used) == 1


async def test_dry_run_is_counted_once(gw):
    await gw.check(f"/{SVC}/UpdateLimits", "alice")
    await gw.check(f"/{SVC}/UpdateLimits", "alice", dry_run=True)
    await asyncio.sleep(0)
    assert gw.metrics.registry.get_sample_value(
        "rpcauthz_dry_run_decisions_total",
        {"shadow": "would_deny", "mode": "CONTRIBUTORS_WITHOUT_APPROVAL"}) == 1
    assert gw.metrics.registry.get_sample_value(
        "rpcauthz_decisions_total", {"outcome": "allow", "mode": "CONTRIBUTORS_WITHOUT_APPROVAL",
                                     "rule": "dry_run.would_deny"}) == 1
