"""Requester limits through the JSON API and the store (issue 10, finding 1): a second ask for
the same scope narrows the pending request before any approval, opens its own after one, and
never widens; the store itself refuses a transition that widens a limit."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from mpa.config import RequestPolicy
from policy import Mode
from tests.support.approvals_env import LEDGER, approvals_env

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
BODY = "ab" * 32


@pytest.fixture
def env(tmp_path):
    with approvals_env(tmp_path) as e:
        yield e


def ask(env, status: int, who=A, method="Adjust", **extra):
    body = {"service": LEDGER, "method": method, "reason": "refund for ticket 4411", **extra}
    resp = env.call("POST", "/api/v1/requests", who, json=body)
    assert resp.status_code == status, resp.text
    return resp.json()


def test_gateway_request_takes_the_requesters_narrower_limits(env):
    gw = env.gateway_request(A)
    assert gw.max_uses is None and gw.approval_ttl == timedelta(hours=1)
    r = ask(env, 200, max_uses=1, duration_seconds=600, body_sha256=BODY)
    assert r["id"] == gw.id and r["awaiting_reason"] is False
    assert (r["max_uses"], r["approval_ttl_seconds"], r["body_sha256"]) == (1, 600, BODY)
    stored = env.store.get_request(gw.id)
    assert (stored.max_uses, stored.approval_ttl, stored.body_sha256) == (1, timedelta(minutes=10), BODY)


def test_second_ask_narrows_a_pending_request_and_never_widens(env):
    first = ask(env, 201, max_uses=3, duration_seconds=1800)
    narrower = ask(env, 200, max_uses=1)
    assert narrower["id"] == first["id"]
    assert (narrower["max_uses"], narrower["approval_ttl_seconds"]) == (1, 1800)
    wider = ask(env, 200, max_uses=5, duration_seconds=3600)
    assert wider["id"] == first["id"]
    assert (wider["max_uses"], wider["approval_ttl_seconds"]) == (1, 1800)
    kinds = [e.kind for e in env.store.list_audit() if e.request_id == first["id"]]
    assert kinds == ["request.created", "request.narrowed"]


def test_narrower_ask_after_an_approval_opens_its_own_request(tmp_path):
    with approvals_env(tmp_path, rules=RequestPolicy(required_approvals_by_mode={Mode.ENGINEERS_WITH_APPROVAL: 2})) as env:
        first = ask(env, 201)
        assert env.call("POST", f"/api/v1/requests/{first['id']}/approve", B).status_code == 200
        same = ask(env, 200)
        assert same["id"] == first["id"]
        own = ask(env, 201, max_uses=1)
        assert own["id"] != first["id"] and own["max_uses"] == 1
        assert env.store.get_request(first["id"]).max_uses is None  # what B approved stays


def test_store_refuses_a_transition_that_widens_limits(env):
    r = ask(env, 201, max_uses=1, duration_seconds=600)
    for widen in ({"max_uses": None}, {"max_uses": 2}, {"approval_ttl": timedelta(hours=1)}):
        with pytest.raises(ValueError, match="may not change"):
            env.store.update_request(r["id"], lambda cur, w=widen: dataclasses.replace(cur, **w),
                                     actor=A, kind="request.narrowed")
    env.call("POST", f"/api/v1/requests/{r['id']}/approve", B)
    with pytest.raises(ValueError, match="may not change"):  # approved: limits are final
        env.store.update_request(r["id"], lambda cur: dataclasses.replace(cur, body_sha256=BODY),
                                 actor=A, kind="request.narrowed")


@pytest.mark.parametrize("seconds, words", [(3600, "1 hour"), (8 * 3600, "8 hours"), (60, "1 minute"),
                                            (5400, "90 minutes"), (1, "1 second"), (45, "45 seconds"),
                                            (0, "0 seconds")])
def test_durations_in_words(seconds, words):
    from mpa.service import spoken_duration
    assert spoken_duration(timedelta(seconds=seconds)) == words
