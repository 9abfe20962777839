"""Read scopes (issue 9, finding 6): a request, with its reason and incident, is visible to its
requester, to those who approved it or may approve it, and to auditors; everyone else gets 403
with a message saying who may see it. Listing every request is for auditors only."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from policy import Grant, Role
from tests.support.approvals_env import LEDGER, approvals_env

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"  # C: another contributor
OUTSIDER = "mallory@example.com"  # no grants at all
AUDITOR = "audrey@example.com"    # no grants, listed in `auditors`


@pytest.fixture
def env(tmp_path):
    with approvals_env(tmp_path, config={"auditors": (AUDITOR,)}) as e:
        yield e


def _close_request(env) -> str:
    resp = env.call("POST", "/api/v1/requests", A, json={
        "service": LEDGER, "method": "Close", "reason": "incident 77: close the ledger"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_a_request_is_visible_to_requester_approvers_and_auditors_only(env):
    rid = _close_request(env)  # CONTRIBUTORS_WITH_APPROVAL: carol may approve, bob may not
    for who in (A, C, AUDITOR):
        resp = env.call("GET", f"/api/v1/requests/{rid}", who)
        assert resp.status_code == 200, (who, resp.text)
        assert resp.json()["reason"] == "incident 77: close the ledger"
    for who in (B, OUTSIDER):
        resp = env.call("GET", f"/api/v1/requests/{rid}", who)
        assert resp.status_code == 403, (who, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "not_visible"
        assert f"{who} may not see request {rid}" in err["message"]
        assert "a contributor of demo.v1.Ledger" in err["message"] and "auditors" in err["message"]
        assert "incident 77" not in resp.text
    # Once carol approved, she still sees it (approvers keep their view).
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", C).status_code == 200
    assert env.call("GET", f"/api/v1/requests/{rid}", C).status_code == 200


def test_listing_every_request_is_for_auditors(env):
    rid = _close_request(env)
    for who in (B, OUTSIDER, A):
        resp = env.call("GET", "/api/v1/requests?scope=all", who)
        assert resp.status_code == 403, (who, resp.text)
        msg = resp.json()["error"]["message"]
        assert "scope=all" in msg and "auditors only" in msg and "scope=mine" in msg
        assert "incident 77" not in resp.text
    resp = env.call("GET", "/api/v1/requests?scope=all", AUDITOR)
    assert resp.status_code == 200 and [r["id"] for r in resp.json()["requests"]] == [rid]
    # The ordinary scopes still work for everyone.
    assert [r["id"] for r in env.call("GET", "/api/v1/requests?scope=mine", A).json()["requests"]] == [rid]
    assert [r["id"] for r in env.call("GET", "/api/v1/requests?scope=reviewable", C).json()["requests"]] == [rid]
    assert env.call("GET", "/api/v1/requests?scope=reviewable", B).json()["requests"] == []


def test_an_auditor_grant_reads_every_request_like_the_auditors_list(env):
    """The auditor role (``mpactl grants add WHO auditor``) counts alongside ``auditors``, and
    follows the grants: granted -> 200, removed or expired -> 403 again."""
    rid = _close_request(env)
    gina = "gina@example.com"  # an engineer with no say over demo.v1.Ledger
    assert env.call("GET", f"/api/v1/requests/{rid}", gina).status_code == 403
    assert env.call("GET", "/api/v1/requests?scope=all", gina).status_code == 403

    env.store.put_grant(Grant(gina, Role.AUDITOR), actor="test")
    one = env.call("GET", f"/api/v1/requests/{rid}", gina)
    assert one.status_code == 200 and one.json()["reason"] == "incident 77: close the ledger"
    every = env.call("GET", "/api/v1/requests?scope=all", gina)
    assert every.status_code == 200 and [r["id"] for r in every.json()["requests"]] == [rid]
    # Reading is all it gives: an auditor may not approve.
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", gina).status_code == 403

    env.store.delete_grant(gina, Role.AUDITOR, actor="test")
    resp = env.call("GET", "/api/v1/requests?scope=all", gina)
    assert resp.status_code == 403 and "an `auditor` grant" in resp.json()["error"]["message"]
    env.store.put_grant(Grant(gina, Role.AUDITOR, expires_at=datetime.now(UTC) - timedelta(minutes=1)),
                        actor="test")
    assert env.call("GET", f"/api/v1/requests/{rid}", gina).status_code == 403
