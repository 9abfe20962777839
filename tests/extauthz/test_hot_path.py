"""The fast paths of a warm check give exactly the answers of the full path.

Warm checks are decided from memory without arming a deadline timer, allow responses are
copied from cached templates, allow audit events are built by the audit writer and written
in batches. None of that may change an answer, a header, the dynamic metadata or what is
audited; these tests compare the fast paths against the full ones and pin the audit writer.
"""
from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format, struct_pb2

import policy
from extauthz import responses
from extauthz.audit_writer import AuditWriter
from extauthz.config import ConfigError, load_settings
from extauthz.metrics import Metrics
from extauthz.pipeline import Authorizer, audit_event_id
from extauthz.verdict import Kind, Verdict
from policy import Grant, GrantSet, Mode, Role, StoreError, Target
from policy.audit import AuditEvent
from policy.rules import Rule
from policy.stores import open_store
from reflection_cache.cache import CacheSettings, ReflectionCache
from reflection_cache.endpoints import EndpointResolver
from reflection_cache.types import ReflectionUnavailable, ServiceModes
from tests.support.extauthz_doubles import FixedGrants, FreshModes, PathModes, StaticModes
from tests.support.grpc_frames import frame

SVC = "rpcauthz.demo.v1.Accounts"
MODES = {
    "Open": Mode.ENGINEERS_WITHOUT_APPROVAL,
    "Read": Mode.ENGINEERS_WITH_APPROVAL,
    "Tune": Mode.CONTRIBUTORS_WITHOUT_APPROVAL,
    "Close": Mode.CONTRIBUTORS_WITH_APPROVAL,
    "Erase": Mode.BREAK_GLASS_ONLY,
    "Ping": None,
}
GRANTS = GrantSet([
    Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER), Grant("carol", Role.ENGINEER),
    Grant("carol", Role.CONTRIBUTOR, SVC), Grant("sec", Role.ENGINEER),
    Grant("sec", Role.SECURITY_ONCALL),
])
FIXED_NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class Harness:
    def __init__(self, modes, grants=None, clock=None, **overrides) -> None:
        self.settings = load_settings(env={}, overrides={"store_url": "memory:", **overrides})
        self.store = open_store("sqlite:///:memory:")
        self.modes = modes
        self.metrics = Metrics()
        self.audit = AuditWriter(self.store, self.metrics, 1000)
        kwargs = {"clock": clock} if clock else {}
        self.authorizer = Authorizer(self.settings, store=self.store, grants=grants or FixedGrants(GRANTS),
                                     modes=modes, audit=self.audit, metrics=self.metrics, **kwargs)

    async def check(self, path: str, principal: str | None = "alice", headers=None, body: bytes = b"",
                    size: int | None = None, method: str = "POST"):
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.path, http.method = path, method
        for k, v in (headers or {}).items():
            http.headers[k] = v
        if body:
            http.raw_body = body
            http.size = size if size is not None else len(body)
        if principal is not None:
            payload = struct_pb2.Struct()
            payload.update({"jwt_payload": {"sub": principal, "iss": "x"}})
            req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
        return await self.authorizer.check(req)

    async def close(self) -> None:
        await self.audit.close()
        self.store.close()


def comparable(resp: external_auth_pb2.CheckResponse) -> dict:
    """The response as a dict with the (random) decision id replaced by a placeholder."""
    d = json_format.MessageToDict(resp)
    decision_id = d["dynamicMetadata"]["decision_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", decision_id)
    return json_format.MessageToDict(resp) | {
        "dynamicMetadata": {**d["dynamicMetadata"], "decision_id": "<id>"},
        **({"okResponse": _replace_id(d["okResponse"], decision_id)} if "okResponse" in d else {}),
        **({"deniedResponse": _replace_id(d["deniedResponse"], decision_id)} if "deniedResponse" in d else {}),
        **({"status": _replace_id(d["status"], decision_id)} if "status" in d else {}),
    }


def _replace_id(part, decision_id: str):
    if isinstance(part, dict):
        return {k: _replace_id(v, decision_id) for k, v in part.items()}
    if isinstance(part, list):
        return [_replace_id(v, decision_id) for v in part]
    if isinstance(part, str):
        return part.replace(decision_id, "<id>")
    return part


CASES = [
    # (path, principal, headers, body, size, method)
    (f"/{SVC}/Open", "alice", {}, b"", None, "POST"),
    (f"/{SVC}/Open", "alice", {"x-rpcauthz-principal": "mallory", "X-RpcAuthz-Approval": "forged",
                              "x-other": "1"}, b"", None, "POST"),
    (f"/{SVC}/Open", "bob", {}, frame(b"\x0a\x01a"), None, "POST"),
    (f"/{SVC}/Open", "nobody", {}, b"", None, "POST"),
    (f"/{SVC}/Tune", "alice", {}, b"", None, "POST"),
    (f"/{SVC}/Tune", "carol", {}, b"", None, "POST"),
    (f"/{SVC}/Close", "alice", {}, b"", None, "POST"),
    (f"/{SVC}/Erase", "carol", {}, b"", None, "POST"),
    (f"/{SVC}/Ping", "carol", {}, b"", None, "POST"),  # unannotated: default BREAK_GLASS_ONLY
    (f"/{SVC}/Nope", "alice", {}, b"", None, "POST"),
    ("/no.Such/Method", "alice", {}, b"", None, "POST"),
    (f"/{SVC}/Open/extra", "alice", {}, b"", None, "POST"),
    (f"/{SVC}/Open", None, {}, b"", None, "POST"),
    (f"/{SVC}/Open", "alice", {}, b"", None, "GET"),
    (f"/{SVC}/Open", "alice", {}, frame(b"x" * 100)[:50], 105, "POST"),
]


@pytest.mark.parametrize("fresh", [FreshModes, PathModes], ids=["get_fresh", "fresh_target"])
async def test_from_memory_path_answers_exactly_like_the_full_path(fresh):
    fast = Harness(fresh({SVC: ServiceModes(SVC, MODES)}), clock=lambda: FIXED_NOW)
    full = Harness(StaticModes({SVC: ServiceModes(SVC, MODES)}), clock=lambda: FIXED_NOW)
    fast.audit.start()
    full.audit.start()
    try:
        for path, principal, headers, body, size, method in CASES:
            a = await fast.check(path, principal, headers, body, size, method)
            b = await full.check(path, principal, headers, body, size, method)
            assert comparable(a) == comparable(b), (path, principal)
        assert fast.modes.fresh_calls > 0 and fast.modes.calls == 1  # only "/no.Such" went on
        if fresh is PathModes:  # by path first; "/Nope" and "/no.Such" went on to get_fresh
            assert fast.modes.path_answers > 0 and fast.modes.fresh_calls == 2
        await asyncio.sleep(0.2)

        def audited(h):
            return sorted(((e.kind, e.actor, e.service, e.method, e.outcome, e.detail["rule"])
                           for e in h.store.list_audit()), key=repr)
        assert audited(fast) == audited(full)
        assert len(audited(fast)) == len(CASES)  # every decision, allows included, is audited
    finally:
        await fast.close()
        await full.close()


async def test_an_indexed_path_over_the_length_limit_is_still_a_bad_path():
    """The mode source's path index skips parse_path; the pipeline still applies its own
    :path length limit, so the answer is the full path's (a bad path), never the index's."""
    long_service = "rpcauthz.demo.v1." + "A" * 40
    services = {long_service: ServiceModes(long_service, MODES)}
    fast = Harness(PathModes(services), clock=lambda: FIXED_NOW, max_path_length=32)
    full = Harness(StaticModes(services), clock=lambda: FIXED_NOW, max_path_length=32)
    roomy = Harness(PathModes(services), clock=lambda: FIXED_NOW)
    try:
        a = await fast.check(f"/{long_service}/Open", "alice")
        b = await full.check(f"/{long_service}/Open", "alice")
        assert comparable(a) == comparable(b)
        assert json_format.MessageToDict(a.dynamic_metadata)["rule"] == Rule.TARGET_BAD_PATH.value
        assert fast.modes.path_answers == 0
        ok = await roomy.check(f"/{long_service}/Open", "alice")  # within the limit: by the index
        assert ok.status.code == 0 and roomy.modes.path_answers == 1
    finally:
        for h in (fast, full, roomy):
            await h.close()


async def test_approval_modes_still_read_and_open_requests_in_the_store():
    h = Harness(FreshModes({SVC: ServiceModes(SVC, MODES)}))
    h.audit.start()
    try:
        first = await h.check(f"/{SVC}/Read", "alice")
        assert first.denied_response.status.code == 403
        url = {o.header.key: o.header.value for o in first.denied_response.headers}["x-mpa-request-url"]
        request_id = url.rsplit("/", 1)[1]
        again = await h.check(f"/{SVC}/Read", "alice")  # reuses the pending request
        assert request_id in again.denied_response.body
        now = datetime.now(UTC)
        h.store.update_request(request_id, lambda r: policy.approve(r, "bob", GRANTS, now), actor="bob",
                               kind="request.approval_recorded")
        ok = await h.check(f"/{SVC}/Read", "alice")
        assert ok.status.code == 0
        set_ = {o.header.key: o.header.value for o in ok.ok_response.headers}
        assert set_["x-rpcauthz-approval"] == request_id
        assert json_format.MessageToDict(ok.dynamic_metadata)["approval_id"] == request_id
    finally:
        await h.close()


async def test_not_fresh_falls_back_to_the_full_path_and_its_deadline():
    modes = FreshModes({SVC: ServiceModes(SVC, MODES)})
    h = Harness(modes, **{"decision_deadline_ms": 100, "reflection.cache.deadline": 0.05})
    h.audit.start()
    try:
        modes.stale = True
        assert (await h.check(f"/{SVC}/Open")).status.code == 0
        assert modes.calls == 1  # went to get()
        modes.delay = 1.0
        started = time.monotonic()
        resp = await h.check(f"/{SVC}/Open")
        assert time.monotonic() - started < 0.9
        assert resp.denied_response.status.code == 503 and "deadline.exceeded" in resp.denied_response.body
        modes.delay, modes.fail = 0.0, ReflectionUnavailable("down")
        resp = await h.check(f"/{SVC}/Open")
        assert resp.denied_response.status.code == 503
    finally:
        await h.close()


async def test_failures_on_the_from_memory_path_are_503_never_allow():
    class Broken(FreshModes):
        def get_fresh(self, service):
            raise RuntimeError("bug")

    class NoGrants:
        def current(self):
            raise StoreError("grants are 300s old")

    h = Harness(Broken({SVC: ServiceModes(SVC, MODES)}))
    g = Harness(FreshModes({SVC: ServiceModes(SVC, MODES)}), grants=NoGrants())
    for harness in (h, g):
        harness.audit.start()
    try:
        resp = await h.check(f"/{SVC}/Open")
        assert resp.status.code != 0 and resp.denied_response.status.code == 503
        assert "internal.error" in resp.denied_response.body
        resp = await g.check(f"/{SVC}/Open")
        assert resp.denied_response.status.code == 503 and "store.unavailable" in resp.denied_response.body
    finally:
        await h.close()
        await g.close()


def _allow(principal="alice", method="Open", decision_id="a" * 32, dev=False, approval_id=None):
    return Verdict(Kind.ALLOW, decision_id, Rule.ENGINEERS_WITHOUT_APPROVAL_ENGINEER,
                   principal=principal, target=Target(SVC, method), mode=Mode.ENGINEERS_WITHOUT_APPROVAL,
                   mode_source="method", dev=dev, approval_id=approval_id)


def test_allow_templates_carry_each_decisions_own_id_principal_and_target():
    seen = set()
    for principal, method, dev in [("alice", "Open", False), ("bob", "Open", False), ("alice", "Tune", False),
                                   ("alice", "Open", True), ("alice", "Open", False)]:
        decision_id = audit_event_id()
        v = _allow(principal, method, decision_id, dev)
        resp = responses.build(v, ["x-rpcauthz-principal", "X-RPCAUTHZ-Approval", "x-other"])
        fresh = responses._build_allow(v, decision_id)
        fresh.ok_response.headers_to_remove.extend(["x-rpcauthz-approval"])
        assert resp == fresh  # the same message as building it from scratch
        meta = json_format.MessageToDict(resp.dynamic_metadata)
        headers = {o.header.key: o.header.value for o in resp.ok_response.headers}
        assert meta["decision_id"] == headers["x-rpcauthz-decision-id"] == decision_id
        assert meta["principal"] == headers["x-rpcauthz-principal"] == principal
        assert meta["target"] == f"/{SVC}/{method}" and meta.get("dev", False) is dev
        seen.add(decision_id)
    assert len(seen) == 5
    # An allow through an approval keeps its approval header and metadata.
    v = _allow(approval_id="req-1")
    resp = responses.build(v, ["x-rpcauthz-approval"])
    assert {o.header.key: o.header.value for o in resp.ok_response.headers}["x-rpcauthz-approval"] == "req-1"
    assert list(resp.ok_response.headers_to_remove) == []
    assert json_format.MessageToDict(resp.dynamic_metadata)["approval_id"] == "req-1"


def test_audit_event_ids_are_unique_hex_and_time_ordered():
    ids = [audit_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    first = audit_event_id()
    time.sleep(0.003)
    assert audit_event_id() > first


def test_batch_window_is_validated():
    assert load_settings(env={}, overrides={"store_url": "memory:"}).audit.batch_window_ms == 50
    with pytest.raises(ConfigError, match="batch_window_ms"):
        load_settings(env={}, overrides={"store_url": "memory:", "audit.batch_window_ms": -1})
    with pytest.raises(ValueError, match="batch_window"):
        AuditWriter(open_store("sqlite:///:memory:"), Metrics(), 10, batch_window=-0.1)


def _event(n: int) -> AuditEvent:
    return AuditEvent(kind="decision.allow", actor=f"user{n}", at=datetime.now(UTC),
                      outcome="allow", detail={"decision_id": str(n)}, id=audit_event_id())


async def test_events_arriving_within_the_window_share_one_transaction():
    store = open_store("sqlite:///:memory:")
    calls = []
    real = store.append_audits

    def spy(events):
        calls.append(len(events))
        real(events)
    store.append_audits = spy
    writer = AuditWriter(store, Metrics(), 1000, batch_window=0.2)
    writer.start()
    try:
        for n in range(20):  # one at a time, the loop running in between
            writer.submit(_event(n))
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.5)
        assert calls == [20]
        # Deferred events are built by the writer; one that fails to build loses only itself.
        metrics = writer._metrics
        writer.submit(lambda: _event(100))
        writer.submit(lambda: 1 / 0)
        writer.submit(_event(101))
        await writer.close()  # flushes at once, without waiting out the window
        assert calls[-1] == 2
        actors = [e.actor for e in store.list_audit()]
        assert {"user100", "user101"} <= set(actors) and len(actors) == 22
        assert metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "build_failed"}) == 1
    finally:
        store.close()


async def test_close_writes_what_is_queued_before_the_window_ends():
    store = open_store("sqlite:///:memory:")
    writer = AuditWriter(store, Metrics(), 1000, batch_window=5.0)
    writer.start()
    try:
        for n in range(3):
            writer.submit(_event(n))
        await asyncio.sleep(0.05)  # the writer is now waiting out its window
        started = time.monotonic()
        await writer.close(timeout=10)
        assert len(store.list_audit()) == 3
        assert time.monotonic() - started < 2  # not the 5 s window
    finally:
        store.close()


async def test_deferred_allow_events_keep_the_decision_time_and_id():
    times = iter([FIXED_NOW + timedelta(seconds=i) for i in range(100)])
    h = Harness(FreshModes({SVC: ServiceModes(SVC, MODES)}), clock=lambda: next(times))
    h.audit.start()
    try:
        resp = await h.check(f"/{SVC}/Open", "alice")
        decision_id = json_format.MessageToDict(resp.dynamic_metadata)["decision_id"]
        await h.audit.close()
        (event,) = [e for e in h.store.list_audit() if e.kind == "decision.allow"]
        assert event.detail["decision_id"] == decision_id and event.actor == "alice"
        assert event.at == FIXED_NOW + timedelta(seconds=1)  # decide() took t+0, the event t+1
    finally:
        h.store.close()


async def test_reflection_cache_get_fresh_only_answers_fresh_hits():
    from devstack.demo_services import start_demo_server

    now = [1000.0]
    server = start_demo_server(services=("accounts",))
    cache = ReflectionCache(EndpointResolver(static={SVC: server.address}),
                            CacheSettings(ttl=60, stale_window=30, negative_ttl=5, deadline=2),
                            clock=lambda: now[0])
    try:
        assert cache.get_fresh(SVC) is None  # a miss: nothing fetched by get_fresh
        assert cache.stats()["misses"] == 0 and cache.stats()["inflight"] == 0
        modes = await cache.get(SVC)
        assert cache.get_fresh(SVC) is modes
        assert modes.mode_for("ListAccounts", Mode.BREAK_GLASS_ONLY)[0] is Mode.ENGINEERS_WITHOUT_APPROVAL
        now[0] += 61  # stale: get() serves it and refreshes; get_fresh says "ask get()"
        assert cache.get_fresh(SVC) is None
        assert cache.get_fresh("no.Such") is None
    finally:
        await cache.close()
        server.stop(grace=0)


def test_allow_template_key_covers_every_field_a_response_shows():
    import dataclasses

    base = _allow()
    variants = {"principal": "bob", "target": Target(SVC, "Tune"),
                "mode": Mode.CONTRIBUTORS_WITHOUT_APPROVAL, "mode_source": "service",
                "rule": Rule.DRY_RUN_WOULD_DENY, "facts": {"decided_rule": "x"}, "dev": True,
                "dry_run": True, "shadow": "would_deny", "request_url": "https://mpa/requests/1"}
    # A field added to Verdict must be added here (and to the template key if shown).
    fresh_path = {"kind", "decision_id", "approval_id", "request_id"}
    assert set(variants) | fresh_path == {f.name for f in dataclasses.fields(Verdict)}
    for field, value in variants.items():
        v = dataclasses.replace(base, **{field: value})
        responses.build(base)  # the template for ``base`` is cached
        assert responses.build(v) == responses._build_allow(v, v.decision_id), field
        assert responses.build(base) == responses._build_allow(base, base.decision_id), field
