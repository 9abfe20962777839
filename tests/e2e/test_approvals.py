"""Approval required -> approval recorded through the real store -> the same call passes."""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest

import policy
from policy import GrantSet, Mode, RequestState, Target
from policy.stores import open_store
from tests.e2e.conftest import CONTRIB, CONTRIB2, ENGINEER, ONCALL, ONCALL2, OTHER
from tests.support.gateway_harness import ACCOUNTS, LEDGER

pytestmark = [pytest.mark.envoy]


@pytest.fixture
def store(sqlite_gateway):
    s = open_store(sqlite_gateway.store_url)
    yield s
    s.close()


def now() -> datetime:
    return datetime.now(UTC)


def request_id_of(result) -> str:
    assert result.code is grpc.StatusCode.PERMISSION_DENIED, result.render()
    assert result.request_url, result.render()
    return result.request_url.rsplit("/", 1)[1]


def approve(store, request_id: str, approver: str, **extra) -> policy.ApprovalRequest:
    grants = GrantSet(store.list_grants())
    return store.update_request(request_id, lambda r: policy.approve(r, approver, grants, now(), **extra),
                                actor=approver, kind="request.approved")


def test_approval_required_then_approved_then_passes(sqlite_gateway, store):
    path = f"/{ACCOUNTS}/CloseAccount"
    first = sqlite_gateway.call(path, as_=CONTRIB, data={"accountId": "A-9"})
    rid = request_id_of(first)
    assert first.request_url == f"https://mpa.example.test/requests/{rid}"
    assert "another contributor" in first.message
    # Asking again points at the same pending request, not a new one.
    assert request_id_of(sqlite_gateway.call(path, as_=CONTRIB)) == rid
    pending = store.get_request(rid)
    assert pending.state is RequestState.PENDING and pending.requester == CONTRIB
    assert (pending.service, pending.method, pending.origin) == (ACCOUNTS, "CloseAccount", "gateway")

    # An engineer who is not a contributor may not approve; carol may not approve her own.
    with pytest.raises(policy.NotEligible):
        approve(store, rid, ENGINEER)
    with pytest.raises(policy.SelfApproval):
        approve(store, rid, CONTRIB)
    still = sqlite_gateway.call(path, as_=CONTRIB)
    assert request_id_of(still) == rid

    approve(store, rid, CONTRIB2)
    ok = sqlite_gateway.call(path, as_=CONTRIB, data={"accountId": "A-9"})
    assert ok.code is grpc.StatusCode.OK, ok.render()
    echo = json.loads(ok.replies[0]["message"])
    assert echo["metadata"]["x-rpcauthz-principal"] == CONTRIB
    assert echo["metadata"]["x-rpcauthz-approval"] == rid
    assert store.get_request(rid).uses == 1
    used = store.list_audit(request_id=rid, kinds=["request.used"])
    assert len(used) == 1, "the spent use must be audited with the spend"
    # The decision's own event is shipped from the gateway's spool (within a batch window).
    deadline = time.monotonic() + 10
    while not store.list_audit(request_id=rid, kinds=["decision.allow_with_approval"]):
        assert time.monotonic() < deadline, "the allowed call must be audited"
        time.sleep(0.05)

    # The approval is carol's: another contributor calling is not covered by it.
    other = sqlite_gateway.call(path, as_=CONTRIB2)
    assert request_id_of(other) != rid


def test_forged_approval_header_is_stripped(sqlite_gateway):
    ok = sqlite_gateway.call(f"/{ACCOUNTS}/ListAccounts", as_=ENGINEER,
                             metadata=[("x-rpcauthz-approval", "forged"),
                                       ("x-rpcauthz-principal", "someone-else")])
    assert ok.code is grpc.StatusCode.OK
    seen = json.loads(ok.replies[0]["message"])["metadata"]
    assert seen["x-rpcauthz-principal"] == ENGINEER
    assert "x-rpcauthz-approval" not in seen


def test_expired_approval_is_refused(sqlite_gateway, store):
    grants = GrantSet(store.list_grants())
    past = now() - timedelta(hours=2)
    r = policy.open_request(request_id="expired-" + now().strftime("%H%M%S%f"), requester=OTHER,
                            target=Target(ACCOUNTS, "ReadAccount"), mode=Mode.ENGINEERS_WITH_APPROVAL,
                            grants=grants, now=past, approval_ttl=timedelta(minutes=10),
                            pending_ttl=timedelta(hours=3), reason="look at A-1")
    store.create_request(policy.approve(r, ENGINEER, grants, past + timedelta(minutes=1)), actor=OTHER)
    result = sqlite_gateway.call(f"/{ACCOUNTS}/ReadAccount", as_=OTHER)
    assert result.code is grpc.StatusCode.PERMISSION_DENIED
    assert "approval required" in result.message
    assert request_id_of(result) != r.id
    assert store.get_request(r.id).uses == 0


def test_break_glass_needs_incident_and_another_oncall(sqlite_gateway, store):
    path = f"/{ACCOUNTS}/EraseCustomerData"
    rid = request_id_of(sqlite_gateway.call(path, as_=ONCALL))
    assert "incident" in sqlite_gateway.call(path, as_=ONCALL).message
    with pytest.raises(policy.InvalidRequest):  # no incident reference yet
        approve(store, rid, ONCALL2)
    store.update_request(rid, lambda r: policy.complete(r, ONCALL, now(), reason="GDPR erase",
                                                        incident="INC-4242"),
                         actor=ONCALL, kind="request.completed")
    approve(store, rid, ONCALL2)
    ok = sqlite_gateway.call(path, as_=ONCALL)
    assert ok.code is grpc.StatusCode.OK, ok.render()
    # Decision audit events are written in the background: give it a moment.
    deadline = time.monotonic() + 10
    while not any(e.request_id == rid for e in store.list_audit(kinds=["break_glass.used"])):
        assert time.monotonic() < deadline, "break_glass.used was never audited"
        time.sleep(0.1)


def test_streaming_method_through_the_gateway(sqlite_gateway, store):
    path = f"/{LEDGER}/WatchEntries"
    rid = request_id_of(sqlite_gateway.call(path, as_=CONTRIB, data={"ledgerId": "L-1"}))
    approve(store, rid, CONTRIB2)
    result = sqlite_gateway.call(path, as_=CONTRIB, data={"ledgerId": "L-1"})
    assert result.code is grpc.StatusCode.OK, result.render()
    assert len(result.replies) == 3
    assert all(json.loads(r["message"])["metadata"]["x-rpcauthz-approval"] == rid for r in result.replies)


def test_payload_scoped_approval(sqlite_gateway, store):
    """An approval bound to one request body covers that body only."""
    import hashlib

    from rpcauthz.demo.v1 import accounts_pb2

    grants = GrantSet(store.list_grants())
    body = accounts_pb2.AccountRequest(account_id="A-7", note="refund").SerializeToString()
    r = policy.open_request(request_id="payload-" + now().strftime("%H%M%S%f"), requester=ENGINEER,
                            target=Target(ACCOUNTS, "ReadAccount"), mode=Mode.ENGINEERS_WITH_APPROVAL,
                            grants=grants, now=now(), reason="refund check",
                            body_sha256=hashlib.sha256(body).hexdigest())
    store.create_request(policy.approve(r, CONTRIB, grants, now()), actor=ENGINEER)
    other = sqlite_gateway.call(f"/{ACCOUNTS}/ReadAccount", as_=ENGINEER,
                                data={"accountId": "A-8", "note": "refund"})
    assert other.code is grpc.StatusCode.PERMISSION_DENIED
    same = sqlite_gateway.call(f"/{ACCOUNTS}/ReadAccount", as_=ENGINEER,
                               data={"accountId": "A-7", "note": "refund"})
    assert same.code is grpc.StatusCode.OK, same.render()
    assert json.loads(same.replies[0]["message"])["metadata"]["x-rpcauthz-approval"] == r.id


def test_last_use_is_spent_once_under_concurrency(sqlite_gateway, store):
    """Eight simultaneous calls on a one-use approval: exactly one passes."""
    from concurrent.futures import ThreadPoolExecutor

    grants = GrantSet(store.list_grants())
    r = policy.open_request(request_id="once-" + now().strftime("%H%M%S%f"), requester=OTHER,
                            target=Target(ACCOUNTS, "ReadAccount"), mode=Mode.ENGINEERS_WITH_APPROVAL,
                            grants=grants, now=now(), reason="one look", max_uses=1)
    store.create_request(policy.approve(r, ENGINEER, grants, now()), actor=OTHER)
    tokens = [sqlite_gateway.token(OTHER) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: sqlite_gateway.call(f"/{ACCOUNTS}/ReadAccount", token=t), tokens))
    codes = [x.code for x in results]
    assert codes.count(grpc.StatusCode.OK) == 1, [x.render() for x in results]
    assert codes.count(grpc.StatusCode.PERMISSION_DENIED) == 7, codes
    assert store.get_request(r.id).uses == 1
