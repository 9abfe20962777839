"""The approvals JSON API against a real server (uvicorn on a free port) and a real store."""
from __future__ import annotations

import time
from datetime import timedelta

import jwt
import pytest

from devstack.devissuer import DevIssuer
from mpa.config import RequestPolicy
from policy import Mode
from tests.support.approvals_env import LEDGER, approvals_env

A, B, C, D, E = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com",
                 "erin@example.com")
OUTSIDER = "mallory@example.com"  # no grants at all


@pytest.fixture
def env(tmp_path):
    with approvals_env(tmp_path) as e:
        yield e


def create(env, who=A, method="Adjust", **extra):
    body = {"service": LEDGER, "method": method, "reason": "refund for ticket 4411", **extra}
    resp = env.call("POST", "/api/v1/requests", who, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def refused(env, resp, status: int, code: str, words: str, request_id: str | None = None,
            before=None):
    """The refusal has the right status, code and message, and changed nothing."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert words in err["message"]
    if request_id is not None:
        assert env.store.get_request(request_id) == before


def test_create_then_approve_by_another_engineer(env):
    r = create(env)
    assert r["state"] == "pending" and r["requester"] == A
    assert r["url"] == f"{env.url}/requests/{r['id']}"
    assert r["path"] == f"/{LEDGER}/Adjust" and r["mode"] == "ENGINEERS_WITH_APPROVAL"
    assert r["you"]["can_approve"] is False and "own request" in r["you"]["why_not"]

    seen = env.call("GET", f"/api/v1/requests/{r['id']}", B).json()
    assert seen["you"]["can_approve"] is True and seen["you"]["why_not"] == ""

    done = env.call("POST", f"/api/v1/requests/{r['id']}/approve", B, json={"comment": "ok"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["state"] == "approved"
    assert [a["approver"] for a in body["approvals"]] == [B]
    assert body["approvals"][0]["comment"] == "ok" and body["valid_until"]
    kinds = [e.kind for e in env.store.list_audit() if e.request_id == r["id"]]
    assert kinds == ["request.created", "request.approved"]


def test_list_mine_reviewable_and_state_filter(env):
    mine = create(env, A)
    other = create(env, C, method="Close")  # contributors only: bob may not review it
    def ids(resp):
        return [x["id"] for x in resp.json()["requests"]]
    assert ids(env.call("GET", "/api/v1/requests", A)) == [mine["id"]]
    assert set(ids(env.call("GET", "/api/v1/requests?scope=reviewable", B))) == {mine["id"]}
    assert set(ids(env.call("GET", "/api/v1/requests?scope=reviewable", A))) == {other["id"]}
    env.call("POST", f"/api/v1/requests/{mine['id']}/approve", B)
    assert ids(env.call("GET", "/api/v1/requests?state=approved", A)) == [mine["id"]]
    assert ids(env.call("GET", "/api/v1/requests?state=pending", A)) == []
    assert ids(env.call("GET", "/api/v1/requests?scope=reviewable", B)) == []
    bad = env.call("GET", "/api/v1/requests?state=open", A)
    refused(env, bad, 422, "invalid_body", "state")


def test_refusals_leave_state_unchanged(env):
    r = create(env)
    rid = r["id"]
    before = env.store.get_request(rid)
    path = f"/api/v1/requests/{rid}/approve"
    refused(env, env.call("POST", path, A), 403, "self_approval",
            "cannot approve their own request", rid, before)
    refused(env, env.call("POST", path, OUTSIDER), 403, "not_eligible",
            "may not approve", rid, before)
    refused(env, env.call("POST", f"/api/v1/requests/{rid}/reject", A), 403, "self_approval",
            "cancel it instead", rid, before)
    # malformed JSON
    refused(env, env.call("POST", path, B, content=b'{"comment": ', headers={"content-type": "application/json"}),
            400, "malformed_json", "not valid JSON", rid, before)
    # unknown fields and wrong types are named
    refused(env, env.call("POST", path, B, json={"comentt": "x"}), 422, "invalid_body", "comentt",
            rid, before)
    # unknown request id
    refused(env, env.call("POST", "/api/v1/requests/doesnotexist/approve", B), 404,
            "unknown_request", "doesnotexist")
    refused(env, env.call("GET", "/api/v1/requests/doesnotexist", B), 404, "unknown_request",
            "no approval request")
    assert [e.kind for e in env.store.list_audit() if e.request_id == rid] == ["request.created"]


def test_contributor_mode_ineligible_approver(env):
    r = create(env, A, method="Close")
    before = env.store.get_request(r["id"])
    refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", B), 403, "not_eligible",
            "contributor", r["id"], before)
    ok = env.call("POST", f"/api/v1/requests/{r['id']}/approve", C)
    assert ok.json()["state"] == "approved"


def test_not_contributor_cannot_request(env):
    resp = env.call("POST", "/api/v1/requests", B, json={"service": LEDGER, "method": "Close",
                                                         "reason": "closing the month early"})
    refused(env, resp, 403, "not_eligible", "may not request")


def test_break_glass_needs_incident_and_oncall(env):
    resp = env.call("POST", "/api/v1/requests", D, json={"service": LEDGER, "method": "Wipe",
                                                         "reason": "data corruption in prod"})
    refused(env, resp, 422, "invalid_request", "incident")
    r = create(env, D, method="Wipe", incident="INC-77")
    before = env.store.get_request(r["id"])
    refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", B), 403, "not_eligible",
            "security on-call", r["id"], before)
    assert env.call("POST", f"/api/v1/requests/{r['id']}/approve", E).json()["state"] == "approved"


def test_approving_twice_and_closed_requests(env):
    r = create(env)
    env.call("POST", f"/api/v1/requests/{r['id']}/approve", B)
    before = env.store.get_request(r["id"])
    refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", B), 409,
            "already_decided", "already approved", r["id"], before)
    refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", C), 409, "closed",
            "approved, not pending", r["id"], before)

    rejected = create(env, A, method="Close")
    env.call("POST", f"/api/v1/requests/{rejected['id']}/reject", C, json={"comment": "not today"})
    before = env.store.get_request(rejected["id"])
    assert before.state.value == "rejected" and before.closed_by == C
    refused(env, env.call("POST", f"/api/v1/requests/{rejected['id']}/approve", C), 409, "closed",
            "rejected", rejected["id"], before)

    cancelled = create(env, B)
    env.call("POST", f"/api/v1/requests/{cancelled['id']}/cancel", B)
    before = env.store.get_request(cancelled["id"])
    refused(env, env.call("POST", f"/api/v1/requests/{cancelled['id']}/approve", C), 409,
            "closed", "cancelled", cancelled["id"], before)


def test_pending_request_expires_and_cannot_be_approved(tmp_path):
    rules = RequestPolicy(pending_ttl=timedelta(seconds=1))
    with approvals_env(tmp_path, rules=rules) as env:
        r = create(env)
        time.sleep(1.2)
        resp = env.call("POST", f"/api/v1/requests/{r['id']}/approve", B)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] in ("closed", "expired")
        assert "expired" in resp.json()["error"]["message"]
        after = env.store.get_request(r["id"])
        assert after.state.value == "expired" and after.approvals == ()
        assert "request.expired" in [e.kind for e in env.store.list_audit() if e.request_id == r["id"]]


def test_sweeper_expires_pending_requests(tmp_path):
    rules = RequestPolicy(pending_ttl=timedelta(seconds=1))
    with approvals_env(tmp_path, rules=rules) as env:
        r = create(env)
        time.sleep(1.1)
        assert env.server.sweep_now() == 1
        assert env.store.get_request(r["id"]).state.value == "expired"
        events = [e for e in env.store.list_audit() if e.request_id == r["id"]]
        assert events[-1].kind == "request.expired" and events[-1].actor == "system"
        assert env.server.sweep_now() == 0


def test_n_of_m_approvals(tmp_path):
    rules = RequestPolicy(required_approvals_by_service={LEDGER: 2})
    with approvals_env(tmp_path, rules=rules) as env:
        r = create(env)
        assert r["required_approvals"] == 2
        one = env.call("POST", f"/api/v1/requests/{r['id']}/approve", B).json()
        assert one["state"] == "pending" and len(one["approvals"]) == 1
        two = env.call("POST", f"/api/v1/requests/{r['id']}/approve", C).json()
        assert two["state"] == "approved" and [a["approver"] for a in two["approvals"]] == [B, C]
        kinds = [e.kind for e in env.store.list_audit() if e.request_id == r["id"]]
        assert kinds == ["request.created", "request.approval_recorded", "request.approved"]


def test_reason_required_and_duration_capped(env):
    short = env.call("POST", "/api/v1/requests", A,
                     json={"service": LEDGER, "method": "Adjust", "reason": "pls"})
    refused(env, short, 422, "invalid_request", "at least 10 characters")
    missing = env.call("POST", "/api/v1/requests", A, json={"service": LEDGER, "method": "Adjust"})
    refused(env, missing, 422, "invalid_body", "reason")
    long = env.call("POST", "/api/v1/requests", A, json={
        "service": LEDGER, "method": "Adjust", "reason": "a long-running migration",
        "duration_seconds": 9 * 3600})
    refused(env, long, 422, "invalid_request", "an approval can last at most 8 hours; this one asked for 9 hours")
    ok = create(env, duration_seconds=600)
    assert ok["approval_ttl_seconds"] == 600
    unknown = env.call("POST", "/api/v1/requests", A,
                       json={"service": LEDGER, "method": "Nope", "reason": "because reasons"})
    refused(env, unknown, 422, "invalid_request", "Nope")
    assert env.store.find_requests(requester=A) and len(env.store.find_requests(requester=A)) == 1


def test_revocation_by_approver(env):
    r = create(env)
    env.call("POST", f"/api/v1/requests/{r['id']}/approve", B)
    before = env.store.get_request(r["id"])
    refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/cancel", C), 403, "not_eligible",
            "requester or an approver", r["id"], before)
    revoked = env.call("POST", f"/api/v1/requests/{r['id']}/cancel", B, json={"comment": "oops"})
    assert revoked.json()["state"] == "cancelled" and revoked.json()["closed_by"] == B


def test_gateway_opened_request_waits_for_reason(env):
    gw = env.gateway_request(A)
    seen = env.call("GET", f"/api/v1/requests/{gw.id}", B).json()
    assert seen["awaiting_reason"] is True and "Waiting for" in seen["you"]["why_not"]
    assert env.call("GET", "/api/v1/requests?scope=reviewable", B).json()["requests"] == []
    before = env.store.get_request(gw.id)
    refused(env, env.call("POST", f"/api/v1/requests/{gw.id}/approve", B), 409, "awaiting_reason",
            "waiting for", gw.id, before)
    refused(env, env.call("POST", f"/api/v1/requests/{gw.id}/complete", B,
                          json={"reason": "I want to help"}), 403, "not_eligible",
            "only", gw.id, before)
    # `mpa request` for the same RPC gives the reason to the request the gateway opened
    again = env.call("POST", "/api/v1/requests", A, json={
        "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"})
    assert again.status_code == 200 and again.json()["id"] == gw.id
    assert again.json()["awaiting_reason"] is False and again.json()["reason"] == "refund for ticket 4411"
    assert [x["id"] for x in env.call("GET", "/api/v1/requests?scope=reviewable", B).json()["requests"]] == [gw.id]
    assert env.call("POST", f"/api/v1/requests/{gw.id}/approve", B).json()["state"] == "approved"


def test_complete_endpoint(env):
    gw = env.gateway_request(A)
    short = env.call("POST", f"/api/v1/requests/{gw.id}/complete", A, json={"reason": "x"})
    refused(env, short, 422, "invalid_request", "at least 10", gw.id, env.store.get_request(gw.id))
    done = env.call("POST", f"/api/v1/requests/{gw.id}/complete", A,
                    json={"reason": "reconcile ledger drift"})
    assert done.status_code == 200 and done.json()["reason"] == "reconcile ledger drift"


def test_token_refusals(env, tmp_path):
    r = create(env)
    url = f"/api/v1/requests/{r['id']}/approve"
    before = env.store.get_request(r["id"])
    no_token = env.call("POST", url)
    refused(env, no_token, 401, "unauthenticated", "Authorization: Bearer", r["id"], before)
    assert no_token.headers["www-authenticate"].startswith("Bearer")
    forger = DevIssuer(tmp_path / "other.pem")  # same issuer name, a different key
    forged = env.call("POST", url, headers={"Authorization": f"Bearer {forger.mint(B)}"})
    refused(env, forged, 401, "unauthenticated", "signing key", r["id"], before)
    # right kid, tampered payload: signature fails
    good = env.issuer.mint(B)
    head, payload, sig = good.split(".")
    evil = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(B.encode(), b"carol@example.com")).decode()
    tampered = env.call("POST", url, headers={"Authorization": f"Bearer {head}.{evil}.{sig}"})
    refused(env, tampered, 401, "unauthenticated", "", r["id"], before)
    expired = env.issuer.mint(B, now=time.time() - 7200, ttl_seconds=60)
    refused(env, env.call("POST", url, headers={"Authorization": f"Bearer {expired}"}), 401,
            "unauthenticated", "expired", r["id"], before)
    wrong_aud = env.issuer.mint(B, aud="someone-else")
    refused(env, env.call("POST", url, headers={"Authorization": f"Bearer {wrong_aud}"}), 401,
            "unauthenticated", "audience", r["id"], before)
    garbage = env.call("POST", url, headers={"Authorization": "Bearer not-a-jwt"})
    refused(env, garbage, 401, "unauthenticated", "not a JWT", r["id"], before)
    unsigned = jwt.encode({"sub": B, "iss": env.issuer.issuer, "aud": "rpcauthz",
                           "exp": int(time.time()) + 60}, None, algorithm="none")
    refused(env, env.call("POST", url, headers={"Authorization": f"Bearer {unsigned}"}), 401,
            "unauthenticated", "", r["id"], before)


def test_whoami(env):
    me = env.call("GET", "/api/v1/me", A).json()
    assert me["principal"] == A and me["roles"] == ["contributor:demo.v1.Ledger", "engineer"]


def test_approval_expires_after_its_duration(env):
    r = create(env, duration_seconds=1)
    approved = env.call("POST", f"/api/v1/requests/{r['id']}/approve", B).json()
    assert approved["state"] == "approved"
    time.sleep(1.2)
    assert env.server.sweep_now() == 1
    after = env.store.get_request(r["id"])
    assert after.state.value == "expired" and after.close_reason == "approval expired"
    assert after.approvers == (B,)  # who approved, and when, stays on record
    shown = env.call("GET", f"/api/v1/requests/{r['id']}", A).json()
    assert shown["state"] == "expired" and shown["approvals"][0]["approver"] == B


def test_gateway_request_completes_without_a_mode_lookup(tmp_path):
    with approvals_env(tmp_path, mode_lookup=None) as env:
        gw = env.gateway_request(A)
        ok = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"})
        assert ok.status_code == 200 and ok.json()["id"] == gw.id
        other = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Close", "reason": "refund for ticket 4411"})
        refused(env, other, 422, "invalid_request", "no way to look up method modes")


@pytest.mark.postgres
def test_loop_and_refusals_on_postgresql(tmp_path, pg_dsn):
    with approvals_env(tmp_path, store_url=pg_dsn) as env:
        r = create(env)
        before = env.store.get_request(r["id"])
        refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", A), 403,
                "self_approval", "own request", r["id"], before)
        assert env.call("POST", f"/api/v1/requests/{r['id']}/approve", B).json()["state"] == "approved"
        refused(env, env.call("POST", f"/api/v1/requests/{r['id']}/approve", B), 409,
                "already_decided", "already approved")
        listed = env.call("GET", "/api/v1/requests?state=approved", A).json()["requests"]
        assert [x["id"] for x in listed] == [r["id"]]


def test_concurrent_approvals_end_consistent(tmp_path):
    """Three reviewers approve a 2-of-M request at once: two count, one is told it is closed,
    and exactly one request.approved event exists."""
    import concurrent.futures

    rules = RequestPolicy(required_approvals_by_mode={Mode.ENGINEERS_WITH_APPROVAL: 2})
    with approvals_env(tmp_path, rules=rules) as env:
        r = create(env)
        heads = {who: env.headers(who) for who in (B, C, D)}
        barrier = __import__("threading").Barrier(3)

        def go(who):
            barrier.wait()
            return env.call("POST", f"/api/v1/requests/{r['id']}/approve", headers=heads[who])
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(go, (B, C, D)))
        codes = sorted(x.status_code for x in results)
        assert codes == [200, 200, 409], [x.text for x in results]
        final = env.store.get_request(r["id"])
        assert final.state.value == "approved" and len(final.approvals) == 2
        kinds = [e.kind for e in env.store.list_audit() if e.request_id == r["id"]]
        assert kinds.count("request.approved") == 1 and kinds.count("request.approval_recorded") == 1
