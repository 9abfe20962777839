"""The Check pipeline on CheckRequests built by hand: identity, target, mode, decision, response.

These drive ``Authorizer.check`` directly with the real SQLite store (in memory) and a
fixed mode map, so each refusal is pinned precisely; the same behaviour through real Envoy, real reflection
and the real stores is in tests/e2e/.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format, struct_pb2

import policy
from extauthz.audit_writer import AuditWriter
from extauthz.body import grpc_message_digest
from extauthz.config import load_settings
from extauthz.metrics import Metrics
from extauthz.pipeline import Authorizer
from policy import Grant, GrantSet, Mode, Role, Target
from policy.stores import open_store
from reflection_cache.types import MalformedDescriptors, ReflectionUnavailable, ServiceModes
from tests.support.extauthz_doubles import DownStore, FixedGrants, StaticModes
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
    Grant("carol", Role.CONTRIBUTOR, SVC), Grant("dave", Role.ENGINEER),
    Grant("dave", Role.CONTRIBUTOR, SVC),
])


class Harness:
    def __init__(self, **overrides) -> None:
        self.settings = load_settings(env={}, overrides={"store_url": "memory:", **overrides})
        self.store = open_store("sqlite:///:memory:")
        self.modes = StaticModes({SVC: ServiceModes(SVC, MODES)})
        self.metrics = Metrics()
        self.audit = AuditWriter(self.store, self.metrics, 100)
        self.authorizer = Authorizer(self.settings, store=self.store, grants=FixedGrants(GRANTS),
                                     modes=self.modes, audit=self.audit, metrics=self.metrics)

    async def check(self, path: str, principal: str | None = "alice", headers=None,
                    body: bytes = b"", claim: str = "sub", method: str = "POST"):
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.path = path
        http.method = method
        for k, v in (headers or {}).items():
            http.headers[k] = v
        if body:
            http.raw_body = body
        if principal is not None:
            payload = struct_pb2.Struct()
            payload.update({"jwt_payload": {claim: principal, "iss": "x"}})
            req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
        return await self.authorizer.check(req)


@pytest.fixture
async def h():
    h = Harness()
    h.audit.start()
    yield h
    await h.audit.close()
    h.store.close()


def meta(resp) -> dict:
    return json_format.MessageToDict(resp.dynamic_metadata)


def denied(resp) -> tuple[int, str]:
    assert resp.WhichOneof("http_response") == "denied_response", resp
    return resp.denied_response.status.code, resp.denied_response.body


def headers(option_list) -> dict[str, str]:
    return {o.header.key: o.header.value for o in option_list}


async def test_allow_sets_upstream_headers_and_strips_forged_ones(h):
    resp = await h.check(f"/{SVC}/Open", headers={"x-rpcauthz-principal": "mallory",
                                                  "x-rpcauthz-approval": "forged", "x-other": "1"})
    assert resp.status.code == 0
    ok = resp.ok_response
    set_ = headers(ok.headers)
    assert set_["x-rpcauthz-principal"] == "alice"
    assert "x-rpcauthz-approval" in ok.headers_to_remove
    assert "x-other" not in ok.headers_to_remove
    m = meta(resp)
    assert m["outcome"] == "allow" and m["mode"] == "ENGINEERS_WITHOUT_APPROVAL"
    assert m["principal"] == "alice" and m["rule"] == "engineers_without_approval.engineer"
    assert set_["x-rpcauthz-decision-id"] == m["decision_id"]


@pytest.mark.parametrize("principal,method,expected", [
    ("nobody", "Open", "principal.not_engineer"),
    ("alice", "Tune", "contributors_without_approval.not_contributor"),
    ("alice", "Close", "contributors_with_approval.not_contributor"),
    ("carol", "Erase", "break_glass_only.not_security_oncall"),
])
async def test_denials_name_rule_principal_method_and_advice(h, principal, method, expected):
    code, body = denied(await h.check(f"/{SVC}/{method}", principal))
    assert code == 403
    assert expected in body and principal in body and f"/{SVC}/{method}" in body
    assert "Ask" in body or "ask" in body


async def test_unannotated_method_takes_configured_default():
    h = Harness(default_mode="ENGINEERS_WITHOUT_APPROVAL")
    resp = await h.check(f"/{SVC}/Ping")
    assert resp.status.code == 0 and meta(resp)["mode"] == "ENGINEERS_WITHOUT_APPROVAL"
    h2 = Harness()  # out of the box: BREAK_GLASS_ONLY
    code, body = denied(await h2.check(f"/{SVC}/Ping"))
    assert code == 403 and "BREAK_GLASS_ONLY" in body


async def test_identity_required(h):
    code, body = denied(await h.check(f"/{SVC}/Open", principal=None))
    assert code == 403 and "identity.unverified" in body and "token" in body
    # A payload without the configured claim is refused too.
    code, body = denied(await h.check(f"/{SVC}/Open", principal="alice", claim="email"))
    assert code == 403 and "'sub'" in body


async def test_principal_claim_is_configurable():
    h = Harness(**{"identity.principal_claim": "email"})
    resp = await h.check(f"/{SVC}/Open", principal="alice", claim="email")
    assert resp.status.code == 0


@pytest.mark.parametrize("principal,why", [
    ("alice\n", "whitespace or control characters"),  # "$" in a regex would let this through
    ("ali ce", "whitespace or control characters"),
    ("alice\x7f", "whitespace or control characters"),
    ("", "empty or absent"),
    ("a" * 257, "longer than 256"),
])
async def test_unusable_principals_are_refused_with_reason(principal, why):
    h = Harness()
    if principal:  # granted, so only the identity rule can refuse it
        h.authorizer.grants = FixedGrants(GrantSet([*GRANTS, Grant(principal, Role.ENGINEER)]))
    code, body = denied(await h.check(f"/{SVC}/Open", principal=principal))
    assert code == 403 and why in body


async def test_dev_mode_reads_header_and_marks_decision():
    h = Harness(**{"identity.dev_mode": True})
    resp = await h.check(f"/{SVC}/Open", principal=None, headers={"x-dev-principal": "alice"})
    assert resp.status.code == 0
    assert meta(resp)["dev"] is True
    assert "x-dev-principal" in resp.ok_response.headers_to_remove
    code, body = denied(await h.check(f"/{SVC}/Open", principal=None))
    assert code == 403 and "x-dev-principal" in body and "dev mode" in body


@pytest.mark.parametrize("path,why", [
    ("", "empty"),
    ("/", "segments"),
    (f"/{SVC}", "segments"),
    (f"/{SVC}/Open/extra", "3 segments"),
    (f"//{SVC}/Open", "3 segments"),
    (f"/{SVC}/Open?x=1", "query"),
    (f"/{SVC}/Open#frag", "fragment"),
    (f"/{SVC}/%4Fpen", "percent-encoded"),
    (f"/{SVC}%2FOpen", "percent-encoded"),
    (f"{SVC}/Open", "does not start with '/'"),
    ("/rpcauthz..Accounts/Open", "no valid service"),
    (f"/{SVC}/Op-en", "no valid method"),
    (f"/{SVC}/Open ", "no valid method"),
    (f"/{SVC}/Open\n", "no valid method"),        # "$" in a regex would let this through
    (f"/{SVC}\n/Open", "no valid service"),
    ("/" + "a" * 600 + "/Open", "over the limit of 512"),
])
async def test_bad_paths_are_refused_with_reason(h, path, why):
    code, body = denied(await h.check(path))
    assert code == 403, body
    assert "target.bad_path" in body and why in body
    assert h.modes.calls == 0  # never even looked up


async def test_non_post_is_refused(h):
    code, body = denied(await h.check(f"/{SVC}/Open", method="GET"))
    assert code == 403 and "target.not_grpc" in body


async def test_unknown_service_and_method_are_denied(h):
    code, body = denied(await h.check("/other.Svc/Open"))
    assert code == 403 and "target.unknown_service" in body
    code, body = denied(await h.check(f"/{SVC}/Nope"))
    assert code == 403 and "target.unknown_method" in body


@pytest.mark.parametrize("error,rule", [
    (ReflectionUnavailable("connection refused"), "reflection.reflection_unavailable"),
    (MalformedDescriptors("does not link"), "reflection.malformed_descriptors"),
])
async def test_reflection_failure_is_503(h, error, rule):
    h.modes.fail = error
    resp = await h.check(f"/{SVC}/Open")
    code, body = denied(resp)
    assert code == 503 and resp.status.code == 14
    assert rule in body and "alice" in body
    assert meta(resp)["outcome"] == "error"


async def test_slow_reflection_ends_as_our_503_before_the_deadline():
    h = Harness(decision_deadline_ms=200, **{"reflection.cache.deadline": 0.1})
    h.modes.delay = 5
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await h.check(f"/{SVC}/Open")
    assert loop.time() - t0 < 2.0
    code, body = denied(resp)
    assert code == 503 and "deadline.exceeded" in body and "alice" in body and f"/{SVC}/Open" in body


async def test_store_down_is_503_for_approval_modes(h):
    h.authorizer.store = DownStore()
    resp = await h.check(f"/{SVC}/Read")
    code, body = denied(resp)
    assert code == 503 and resp.status.code == 14 and "store.unavailable" in body


async def test_bug_is_503_never_allow(h):
    class Boom:
        def current(self):
            raise RuntimeError("boom")
    h.authorizer.grants = Boom()
    code, body = denied(await h.check(f"/{SVC}/Open"))
    assert code == 503


async def test_approval_required_then_approved_then_used_up():
    h = Harness(**{"approvals.max_uses": 1})
    h.audit.start()
    resp = await h.check(f"/{SVC}/Read")
    code, body = denied(resp)
    assert code == 403 and "approval required" in body
    link = headers(resp.denied_response.headers)["x-mpa-request-url"]
    request_id = link.rsplit("/", 1)[1]
    assert link == f"http://127.0.0.1:8080/requests/{request_id}" and link in body
    assert meta(resp)["request_id"] == request_id
    # The same call again reuses the pending request.
    again = await h.check(f"/{SVC}/Read")
    assert headers(again.denied_response.headers)["x-mpa-request-url"] == link
    stored = h.store.get_request(request_id)
    assert stored.origin == "gateway" and stored.requester == "alice"
    now = datetime.now(UTC)
    with pytest.raises(policy.SelfApproval):
        h.store.update_request(request_id, lambda r: policy.approve(r, "alice", GRANTS, now),
                               actor="alice", kind="request.approved")
    assert stored.max_uses == 1  # approvals.max_uses
    h.store.update_request(request_id, lambda r: policy.approve(r, "bob", GRANTS, now),
                           actor="bob", kind="request.approved")
    ok = await h.check(f"/{SVC}/Read")
    assert ok.status.code == 0
    assert headers(ok.ok_response.headers)["x-rpcauthz-approval"] == request_id
    assert h.store.get_request(request_id).uses == 1
    # The store's ledger holds the use (with the decision id); the decision event follows.
    used = [e for e in h.store.list_audit() if e.request_id == request_id and e.kind == "request.used"]
    assert [e.detail["decision_id"] for e in used] == [meta(ok)["decision_id"]]
    await _audited(h, lambda kinds: "decision.allow_with_approval" in kinds, request_id)
    # max_uses=1: the next call needs a new approval.
    code, body = denied(await h.check(f"/{SVC}/Read"))
    assert code == 403 and request_id not in body
    await h.audit.close()


async def test_expired_approval_is_refused(h):
    now = datetime.now(UTC)
    r = policy.open_request(request_id="r1", requester="alice", target=Target(SVC, "Read"),
                            mode=Mode.ENGINEERS_WITH_APPROVAL, grants=GRANTS,
                            now=now - timedelta(hours=3), approval_ttl=timedelta(minutes=5),
                            pending_ttl=timedelta(hours=5))
    h.store.create_request(policy.approve(r, "bob", GRANTS, now - timedelta(hours=2)), actor="x")
    code, body = denied(await h.check(f"/{SVC}/Read"))
    assert code == 403 and "approval required" in body and "r1" not in body


async def test_break_glass_use_is_audited():
    h = Harness()
    h.audit.start()
    grants = GrantSet(list(GRANTS) + [Grant("sec1", Role.ENGINEER), Grant("sec1", Role.SECURITY_ONCALL),
                                      Grant("sec2", Role.ENGINEER), Grant("sec2", Role.SECURITY_ONCALL)])
    h.authorizer.grants = FixedGrants(grants)
    now = datetime.now(UTC)
    r = policy.open_request(request_id="bg1", requester="sec1", target=Target(SVC, "Erase"),
                            mode=Mode.BREAK_GLASS_ONLY, grants=grants, now=now, incident="INC-1")
    h.store.create_request(policy.approve(r, "sec2", grants, now), actor="sec1")
    resp = await h.check(f"/{SVC}/Erase", "sec1")
    assert resp.status.code == 0
    await h.audit.close()
    kinds = [e.kind for e in h.store.list_audit()]
    assert "break_glass.used" in kinds and "decision.allow_with_approval" in kinds


async def test_payload_scoped_approval_matches_only_that_body(h):
    body_ok = b"\x0a\x02a1"
    digest = hashlib.sha256(body_ok).hexdigest()
    assert grpc_message_digest(frame(body_ok)) == digest
    now = datetime.now(UTC)
    r = policy.open_request(request_id="p1", requester="alice", target=Target(SVC, "Read"),
                            mode=Mode.ENGINEERS_WITH_APPROVAL, grants=GRANTS, now=now,
                            body_sha256=digest)
    h.store.create_request(policy.approve(r, "bob", GRANTS, now), actor="x")
    code, _ = denied(await h.check(f"/{SVC}/Read", body=frame(b"\x0a\x02a2")))
    assert code == 403
    assert (await h.check(f"/{SVC}/Read", body=frame(body_ok))).status.code == 0


async def test_audit_and_metrics_record_decisions(h):
    await h.check(f"/{SVC}/Open")
    await h.check(f"/{SVC}/Tune")
    await asyncio.sleep(0.1)
    kinds = [e.kind for e in h.store.list_audit()]
    assert "decision.allow" in kinds and "decision.deny" in kinds
    deny = next(e for e in h.store.list_audit() if e.kind == "decision.deny")
    assert deny.actor == "alice" and deny.method == "Tune" and deny.detail["rule"]
    v = h.metrics.registry.get_sample_value(
        "rpcauthz_decisions_total", {"outcome": "deny", "mode": "CONTRIBUTORS_WITHOUT_APPROVAL",
                                     "rule": "contributors_without_approval.not_contributor"})
    assert v == 1


async def test_audit_failure_never_changes_the_decision(h):
    h.audit._store = DownStore()
    assert (await h.check(f"/{SVC}/Open")).status.code == 0
    await asyncio.sleep(0.1)
    assert h.metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "write_failed"}) == 1


def test_digest_needs_exactly_one_uncompressed_frame():
    assert grpc_message_digest(b"") is None
    assert grpc_message_digest(frame(b"ab") + frame(b"cd")) is None
    assert grpc_message_digest(b"\x01" + frame(b"ab")[1:]) is None
    assert grpc_message_digest(frame(b"abc")[:-1]) is None
    assert grpc_message_digest(frame(b"")) == hashlib.sha256(b"").hexdigest()


async def test_body_larger_than_what_envoy_sent_is_denied(h):
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.path, http.method = f"/{SVC}/Open", "POST"
    http.raw_body = frame(b"x" * 100)[:50]
    http.size = 105
    payload = struct_pb2.Struct()
    payload.update({"jwt_payload": {"sub": "alice"}})
    req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    code, body = denied(await h.authorizer.check(req))
    assert code == 403 and "request.body_too_large" in body and "105" in body


async def test_audit_events_queued_together_are_written_in_one_batch(h):
    calls = []
    real = h.store.append_audits

    def spy(events):
        calls.append(len(events))
        real(events)
    h.store.append_audits = spy
    await asyncio.gather(*(h.check(f"/{SVC}/Open") for _ in range(50)))
    await asyncio.sleep(0.2)
    assert sum(calls) == 50 and len(calls) < 50
    assert len([e for e in h.store.list_audit() if e.kind == "decision.allow"]) == 50


async def _audited(h, pred, request_id=None, timeout=5.0):
    """Wait (bounded) until the audit kinds (of ``request_id``, if given) satisfy ``pred``."""
    deadline = time.monotonic() + timeout
    while True:
        kinds = [e.kind for e in h.store.list_audit() if request_id is None or e.request_id == request_id]
        if pred(kinds) or time.monotonic() > deadline:
            assert pred(kinds), kinds
            return kinds
        await asyncio.sleep(0.02)


class _HangsBeforeSpending:
    """The real store, but ``spend_use`` stalls first (a hung connection), then goes on."""

    def __init__(self, store, hang: float) -> None:
        self._store, self.hang, self.finished = store, hang, threading.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def spend_use(self, *args, **kwargs):
        try:
            time.sleep(self.hang)
            return self._store.spend_use(*args, **kwargs)
        finally:
            self.finished.set()


async def test_hung_store_never_spends_a_use_for_a_call_answered_503():
    """Finding 5: a spend that reaches the store after the check was answered 503 must not spend
    the use, and the audit must not also hold an allow for that decision."""
    h = Harness(decision_deadline_ms=700)
    h.audit.start()
    try:
        first = await h.check(f"/{SVC}/Read")
        request_id = headers(first.denied_response.headers)["x-mpa-request-url"].rsplit("/", 1)[1]
        now = datetime.now(UTC)
        h.store.update_request(request_id, lambda r: policy.approve(r, "bob", GRANTS, now),
                               actor="bob", kind="request.approved")
        hung = _HangsBeforeSpending(h.store, hang=1.5)
        h.authorizer.store = hung
        resp = await h.check(f"/{SVC}/Read")
        code, body = denied(resp)
        assert code == 503 and "deadline" in body
        assert await asyncio.to_thread(hung.finished.wait, 10)  # the stalled spend went on...
        assert h.store.get_request(request_id).uses == 0        # ...and spent nothing
        kinds = [e.kind for e in h.store.list_audit() if e.request_id == request_id]
        assert "decision.allow_with_approval" not in kinds
        # With the store well again the approval is still there to use, once.
        h.authorizer.store = h.store
        ok = await h.check(f"/{SVC}/Read")
        assert ok.status.code == 0 and h.store.get_request(request_id).uses == 1
    finally:
        await h.audit.close()
        h.store.close()
