"""Slack: a webhook that is down, then slow, then back. Decisions never wait; nothing is lost."""
from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest

import policy
from mpa.config import RequestPolicy
from mpa.slack import SlackNotifier
from rpcauthz.slack_outbox import SlackDelivery, SlackSpool
from tests.conftest import free_port
from tests.support.approvals_env import LEDGER, approvals_env, open_test_store, seed_grants
from tests.support.fake_slack import FakeSlack

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
SECRET = "T0000/B0000/XXXXsecretXXXXwebhookXXXX"


def wait_for(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def test_slack_down_then_slow_then_back_loses_nothing(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/services/{SECRET}"
    rules = RequestPolicy(pending_ttl=timedelta(seconds=6))
    slack = None
    with approvals_env(tmp_path, rules=rules, audit_interval=0.1, slack_timeout=0.5,
                       slack_backoff=(0.1, 0.4),
                       config={"slack_webhook_url": webhook,
                               "slack_spool_path": str(tmp_path / "spool.db")}) as env:
        spool = env.server.spool
        body = {"service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}
        try:
            # --- Slack is down: nothing listens on its port -------------------------------
            made, t1 = timed(lambda: env.call("POST", "/api/v1/requests", A, json=body))
            approved, t2 = timed(lambda: env.call("POST", f"/api/v1/requests/{made.json()['id']}/approve", B))
            first = made.json()["id"]
            assert approved.json()["state"] == "approved"
            gw = env.gateway_request(C)  # waits for carol's reason: nobody is told yet
            expiring = env.call("POST", "/api/v1/requests", B, json=body).json()["id"]
            wait_for(lambda: f"approved:{first}" in spool.keys())
            assert f"new:{gw.id}" not in spool.keys()
            wait_for(lambda: spool._db.execute(
                "SELECT MIN(attempts) FROM slack_outbox").fetchone()[0] >= 1)  # tried, failed
            assert spool.counts()["delivered"] == 0

            # --- Slack is slow: answers after 2 s, our timeout is 0.5 s ---------------------
            slack = FakeSlack(port)
            slack.mode = "slow"
            completed, t3 = timed(lambda: env.call("POST", f"/api/v1/requests/{gw.id}/complete", C,
                                                   json={"reason": "reconcile ledger drift"}))
            assert completed.status_code == 200
            rejected, t4 = timed(lambda: env.call("POST", f"/api/v1/requests/{gw.id}/reject", A,
                                                  json={"comment": "use the runbook"}))
            assert rejected.json()["state"] == "rejected"
            time.sleep(1.0)
            # every decision answered without waiting for Slack (generous bound)
            assert max(t1, t2, t3, t4) < 1.5, (t1, t2, t3, t4)

            # --- Slack is back --------------------------------------------------------------
            slack.mode = "ok"
            # bob's unreviewed request runs out (pending TTL 6 s) and the sweeper expires it
            wait_for(lambda: env.server.sweep_now() > 0 or
                     env.store.get_request(expiring).state.value == "expired", timeout=15)
            expected = {f"new:{first}", f"approved:{first}", f"new:{gw.id}", f"rejected:{gw.id}",
                        f"new:{expiring}", f"expired:{expiring}:pending"}
            wait_for(lambda: expected <= set(spool.keys(delivered=True)) and spool.counts()["pending"] == 0)
        finally:
            if slack:
                slack.close()

    texts = [json.dumps(p) for _, p in slack.received]
    assert all(path == f"/services/{SECRET}" for path, _ in slack.received)
    new_first = next(p for _, p in slack.received if p["text"].startswith(A) and "asks" in p["text"])
    button = new_first["blocks"][-1]["elements"][0]
    assert button["url"] == f"{env.url}/requests/{first}"  # a deep link to that very request
    flat = json.dumps(new_first)
    assert A in flat and f"/{LEDGER}/Adjust" in flat and "refund for ticket 4411" in flat
    assert any(f"Approved by {B}" in t and f"{A}, your call" in t for t in texts)
    assert any(f"Rejected by {A}" in t and f"{C}, your request" in t for t in texts)
    assert any("reconcile ledger drift" in t for t in texts)  # gateway request: told with the reason
    assert any(f"{B}, your request" in t and "expired" in t for t in texts)

    # the webhook URL is a secret: not in any log line, nor in the spool
    assert SECRET not in caplog.text
    assert SECRET not in (tmp_path / "spool.db").read_bytes().decode("latin-1")
    assert "Slack delivery of" in caplog.text  # failures were logged (without the URL)
    assert SECRET not in repr(env.server.config)


def test_user_text_cannot_ping_the_channel(tmp_path):
    from rpcauthz.slack_outbox import escape_mrkdwn as _esc
    assert _esc("<!channel> & <https://evil|click>") == "&lt;!channel&gt; &amp; &lt;https://evil|click&gt;"


def test_unannounced_gateway_request_expiring_sends_nothing(tmp_path):
    """A gateway-opened request whose requester never gave a reason was never announced, so its
    expiry is not announced either."""
    store = open_test_store(tmp_path)
    spool = SlackSpool(str(tmp_path / "spool.db"))
    try:
        seed_grants(store)
        now = datetime.now(UTC)
        r = policy.open_request(request_id="gw1", requester=A, target=policy.Target(LEDGER, "Adjust"),
                                mode=policy.Mode.ENGINEERS_WITH_APPROVAL,
                                grants=policy.GrantSet(store.list_grants()), now=now,
                                pending_ttl=timedelta(seconds=1), origin="gateway")
        store.create_request(r, actor=A)
        store.update_request("gw1", lambda x: policy.expire(x, now + timedelta(seconds=2)),
                             actor="system", kind="request.expired")
        notifier = SlackNotifier(store, spool, lambda i: f"http://approvals/requests/{i}")
        notifier.export(store.list_audit())
        assert spool.keys() == []
    finally:
        spool.close()
        store.close()


def test_requester_is_mentioned_when_their_slack_id_is_known(tmp_path):
    store = open_test_store(tmp_path)
    spool = SlackSpool(str(tmp_path / "spool.db"))
    try:
        seed_grants(store)
        now = datetime.now(UTC)
        grants = policy.GrantSet(store.list_grants())
        r = policy.open_request(request_id="r1", requester=A, target=policy.Target(LEDGER, "Adjust"),
                                mode=policy.Mode.ENGINEERS_WITH_APPROVAL, grants=grants, now=now,
                                reason="refund for ticket 4411")
        store.create_request(r, actor=A)
        store.update_request("r1", lambda x: policy.approve(x, B, grants, now), actor=B,
                             kind="request.approved")
        notifier = SlackNotifier(store, spool, lambda i: f"http://approvals/requests/{i}",
                                 {A: "U0ALICE1"})
        events = store.list_audit()
        key, payload = notifier.message_for(events[-1], store.get_request("r1"))
        assert key == "approved:r1"
        assert "<@U0ALICE1>, your call" in payload["text"] and f"Approved by {B}" in payload["text"]
        with pytest.raises(ValueError, match="must look like"):
            SlackNotifier(store, spool, str, {A: "<!channel>"})
    finally:
        spool.close()
        store.close()


def test_top_level_text_is_escaped_like_the_blocks(tmp_path):
    """Slack reads the top-level ``text`` as mrkdwn too (notifications, clients without blocks):
    a reason or a rejection comment must not ping @channel or forge a link there."""
    store = open_test_store(tmp_path)
    spool = SlackSpool(str(tmp_path / "spool.db"))
    evil = "<!channel> refund <https://evil.example|here> & more"
    try:
        seed_grants(store)
        now = datetime.now(UTC)
        grants = policy.GrantSet(store.list_grants())
        r = policy.open_request(request_id="r1", requester=A, target=policy.Target(LEDGER, "Adjust"),
                                mode=policy.Mode.ENGINEERS_WITH_APPROVAL, grants=grants, now=now, reason=evil)
        store.create_request(r, actor=A)
        store.update_request("r1", lambda x: policy.reject(x, B, grants, now, reason="<!here> no"), actor=B,
                             kind="request.rejected")
        notifier = SlackNotifier(store, spool, lambda i: f"http://approvals/requests/{i}")
        payloads = [notifier.message_for(e, store.get_request("r1")) for e in store.list_audit()
                    if e.request_id == "r1"]
        payloads = [p for _, p in filter(None, payloads)]
        assert len(payloads) == 2  # created, rejected
        for payload in payloads:
            everything = json.dumps(payload)
            assert "<!channel>" not in everything and "<!here>" not in everything
            assert "<https://evil" not in everything
        assert "&lt;!channel&gt; refund" in payloads[0]["text"] and "&lt;!here&gt; no" in payloads[1]["text"]
    finally:
        spool.close()
        store.close()


def test_slow_webhook_gets_each_message_once(tmp_path):
    """A webhook that takes the message and answers after 2 s used to get it again after a short
    timeout (duplicate posts). Now the answer is waited for; only sending is bounded by `timeout`."""
    port = free_port()
    slack = FakeSlack(port)
    slack.mode = "slow"
    spool = SlackSpool(str(tmp_path / "spool.db"))
    delivery = SlackDelivery(spool, f"http://127.0.0.1:{port}/services/x", timeout=0.5,
                             base_backoff=0.1, max_backoff=0.2, poll=0.1).start()
    try:
        for i in range(3):
            spool.enqueue(f"k{i}", {"text": f"message {i}"})
        delivery.wake()
        wait_for(lambda: spool.counts()["delivered"] == 3, timeout=30)
        time.sleep(2.5)  # anything resent would land by now
        assert sorted(p["text"] for _, p in slack.received) == ["message 0", "message 1", "message 2"]
    finally:
        delivery.close()
        spool.close()
        slack.close()


def test_webhook_that_never_answers_is_not_posted_twice(tmp_path):
    """Past answer_timeout the message may or may not be in Slack: marked delivered with the doubt
    recorded, never resent (Slack has no idempotency key)."""
    port = free_port()
    slack = FakeSlack(port)
    slack.mode = "slow"  # 2 s, above the 0.5 s answer timeout
    spool = SlackSpool(str(tmp_path / "spool.db"))
    delivery = SlackDelivery(spool, f"http://127.0.0.1:{port}/services/x", timeout=0.5, answer_timeout=0.5,
                             base_backoff=0.1, max_backoff=0.2, poll=0.1).start()
    try:
        spool.enqueue("k", {"text": "only once"})
        delivery.wake()
        wait_for(lambda: spool.counts()["delivered"] == 1, timeout=30)
        time.sleep(3)
        assert [p["text"] for _, p in slack.received] == ["only once"]
        (doubt,) = spool._db.execute("SELECT last_error FROM slack_outbox WHERE key = 'k'").fetchone()
        assert "maybe delivered" in doubt
    finally:
        delivery.close()
        spool.close()
        slack.close()
