"""Broker Slack notifications survive a Slack outage and a broker restart (mpa.slack's durable spool).

A real broker (gRPC + TLS) posts to a real local HTTP server; "down" is nothing listening on the
webhook's port (connection refused), "recovered" is the server started on that same port.
"""
from __future__ import annotations

import logging
import sqlite3

import pytest

from devstack.devissuer import DevIssuer
from enclave_bridge.broker.client import BrokerClient
from enclave_bridge.broker.notify import BrokerSlack, MemoryAuditLog
from enclave_bridge.broker.server import start_broker
from enclave_bridge.seeds import SeedBundle
from tests.conftest import free_port
from tests.support.enclave_broker_env import StubSts, broker_config
from tests.support.enclave_broker_slack import SlackStub, wait_for

ALICE, BOB = "alice@example.com", "bob@example.com"
FAST = {"timeout": 2.0, "base_backoff": 0.05, "max_backoff": 0.3, "poll": 0.05}


@pytest.fixture
def env(tmp_path):
    sts, dev = StubSts(), DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience, oidc_issuer="http://127.0.0.1:1")
    slack_port = free_port()
    started: list = []
    try:
        yield {"sts": sts, "dev": dev, "config": config, "seeds": SeedBundle.generate(), "tmp": tmp_path,
               "url": f"http://127.0.0.1:{slack_port}{SlackStub.PATH}", "slack_port": slack_port,
               "started": started}
    finally:
        for thing in reversed(started):
            thing.close()
        sts.close()


def run_broker(env, slack: BrokerSlack):
    runtime = start_broker(env["config"], env["seeds"], state_path=env["tmp"] / "state.db", audit=[MemoryAuditLog()],
                           sts_client=env["sts"].client(), notifiers=[slack.notifier],
                           cert_out=env["tmp"] / "broker.pem")
    env["started"].append(runtime)
    return runtime


def client(env, runtime, who: str) -> BrokerClient:
    return BrokerClient(f"127.0.0.1:{runtime.port}", (env["tmp"] / "broker.pem").read_bytes(), env["dev"].mint(who))


def one_loop(env, runtime, reason: str) -> str:
    """request (alice) -> approve (bob) -> fetch (alice) over the real gRPC API; returns the id."""
    alice, bob = client(env, runtime, ALICE), client(env, runtime, BOB)
    rid = alice.request_aws("platform-admin", reason=reason).id
    bob.review(rid, approve=True, comment="ok")
    assert alice.fetch(rid).aws.access_key_id.startswith("ASIA")
    alice.close()
    bob.close()
    return rid


def texts_for(posts, rid):
    return [p["json"]["text"] for p in posts if f"[request {rid}]" in p["json"]["text"]]


def assert_three_notifications(posts, rid, reason):
    texts = texts_for(posts, rid)
    assert len(texts) == 3, texts  # each exactly once: none lost, none duplicated
    # After an outage each message is retried on its own schedule, so the order may differ.
    wanted = [f"{ALICE} requested AWS role platform-admin: {reason}", f"{BOB} approved {ALICE}'s request",
              f"{ALICE} fetched AWS role platform-admin"]
    assert sorted(next(i for i, w in enumerate(wanted) if w in t) for t in texts) == [0, 1, 2], texts


def test_slack_down_then_up_gets_every_notification(env, caplog):
    caplog.set_level(logging.DEBUG)
    slack = BrokerSlack(env["url"], env["tmp"] / "slack.db", **FAST).start()
    env["started"].append(slack)
    runtime = run_broker(env, slack)

    rid = one_loop(env, runtime, "slack is down")  # Slack down: credentials still flow
    assert wait_for(lambda: all(a >= 2 for *_, a in slack.spool.due(float("inf"))) and
                    len(slack.spool.due(float("inf"))) == 3)  # tried, failed, still queued
    assert slack.spool.counts() == {"pending": 3, "delivered": 0}
    assert any("Slack delivery" in r.getMessage() for r in caplog.records)

    stub = SlackStub(port=env["slack_port"])  # Slack recovers on the same address
    env["started"].append(stub)
    assert wait_for(lambda: slack.spool.counts()["pending"] == 0)
    assert_three_notifications(stub.posts, rid, "slack is down")
    assert all(p["path"] == SlackStub.PATH and p["type"] == "application/json" for p in stub.posts)

    # The webhook URL (the secret) is in no log line and not in the spool file.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SlackStub.PATH not in logged and env["url"] not in logged and "T0/B0" not in logged
    db = sqlite3.connect(env["tmp"] / "slack.db")
    rows = db.execute("SELECT key, payload, last_error FROM slack_outbox").fetchall()
    db.close()
    assert len(rows) == 3 and all(SlackStub.PATH not in " ".join(map(str, row)) for row in rows)
    assert SlackStub.PATH not in repr(slack) and SlackStub.PATH not in repr(slack.delivery)


def test_messages_queued_while_slack_is_down_survive_a_broker_restart(env):
    slack = BrokerSlack(env["url"], env["tmp"] / "slack.db", **FAST).start()
    runtime = run_broker(env, slack)
    rid = one_loop(env, runtime, "before restart")
    assert slack.spool.counts() == {"pending": 3, "delivered": 0}
    runtime.close()
    slack.close()  # the broker stops with Slack still down
    env["started"].clear()

    stub = SlackStub(port=env["slack_port"])
    env["started"].append(stub)
    slack = BrokerSlack(env["url"], env["tmp"] / "slack.db", **FAST).start()  # restart, same spool
    env["started"].append(slack)
    runtime = run_broker(env, slack)
    assert wait_for(lambda: slack.spool.counts() == {"pending": 0, "delivered": 3})
    assert_three_notifications(stub.posts, rid, "before restart")

    rid2 = one_loop(env, runtime, "after restart")  # and new events flow straight through
    assert wait_for(lambda: len(texts_for(stub.posts, rid2)) == 3)
    assert_three_notifications(stub.posts, rid2, "after restart")
    assert len(stub.posts) == 6


def test_slack_answering_errors_is_retried_until_it_accepts(env):
    failing = SlackStub(status=503, port=env["slack_port"])
    env["started"].append(failing)
    slack = BrokerSlack(env["url"], env["tmp"] / "slack.db", **FAST).start()
    env["started"].append(slack)
    runtime = run_broker(env, slack)
    rid = one_loop(env, runtime, "slack answers 503")
    assert wait_for(lambda: len(texts_for(failing.posts, rid)) >= 6)  # each message tried at least twice
    assert slack.spool.counts()["delivered"] == 0
    failing.close()
    env["started"].remove(failing)
    ok = SlackStub(port=env["slack_port"])
    env["started"].append(ok)
    assert wait_for(lambda: slack.spool.counts() == {"pending": 0, "delivered": 3})
    assert_three_notifications(ok.posts, rid, "slack answers 503")


def test_a_webhook_that_is_not_http_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(ValueError) as e:
        BrokerSlack("hooks.slack.com/services/SECRET", tmp_path / "slack.db")
    assert "SECRET" not in str(e.value)
