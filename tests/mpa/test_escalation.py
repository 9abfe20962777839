"""On-call escalation (issue 10, finding 5): a break-glass request pages security on-call with a
PagerDuty Events v2 ``trigger`` once it has its reason, and ``resolve``s when approved; other
modes page nobody; the routing key reaches the receiver but never the spool."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.approvals_env import LEDGER, approvals_env

A, D, E = "alice@example.com", "dave@example.com", "erin@example.com"
ROUTING_KEY = "R0UTINGKEY0123456789abcdefabcdef"


@pytest.fixture
def receiver():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.append({"path": self.path, "type": self.headers.get("Content-Type"),
                        "json": json.loads(body)})
            out = b'{"status":"success","message":"Event processed","dedup_key":"x"}'
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/enqueue", got
    finally:
        server.shutdown()
        server.server_close()


def wait_for(got: list, n: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_break_glass_pages_oncall_and_resolves_on_approval(tmp_path, receiver):
    url, got = receiver
    spool = tmp_path / "oncall-spool.db"
    config = {"oncall_escalation": {"url": url, "routing_key": ROUTING_KEY,
                                    "spool_path": str(spool)}}
    with approvals_env(tmp_path, config=config, audit_interval=0.2) as env:
        plain = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"})
        assert plain.status_code == 201
        r = env.call("POST", "/api/v1/requests", D, json={
            "service": LEDGER, "method": "Wipe", "reason": "erase account A-7 only",
            "incident": "INC-77"}).json()
        wait_for(got, 1)
        assert len(got) == 1, got  # the ENGINEERS_WITH_APPROVAL request paged nobody
        trigger = got[0]
        assert trigger["path"] == "/v2/enqueue" and trigger["type"] == "application/json"
        event = trigger["json"]
        assert event["routing_key"] == ROUTING_KEY
        assert event["event_action"] == "trigger"
        assert event["dedup_key"] == f"rpcauthz-mpa-{r['id']}"
        assert event["payload"]["severity"] == "critical"
        assert event["payload"]["source"] == "rpcauthz-approvals"
        assert event["payload"]["summary"] == (
            f"Break-glass approval needed: {D} asks to call /{LEDGER}/Wipe (incident INC-77)")
        details = event["payload"]["custom_details"]
        assert details["eligible_approvers"] == [E] and details["reason"] == "erase account A-7 only"
        assert event["links"] == [{"href": r["url"], "text": "Review the break-glass request"}]

        assert env.call("POST", f"/api/v1/requests/{r['id']}/approve", E).status_code == 200
        wait_for(got, 2)
        assert [g["json"]["event_action"] for g in got] == ["trigger", "resolve"]
        assert got[1]["json"] == {"routing_key": ROUTING_KEY, "event_action": "resolve",
                                  "dedup_key": f"rpcauthz-mpa-{r['id']}"}
    assert ROUTING_KEY.encode() not in spool.read_bytes()


def test_escalation_config_requires_a_routing_key(tmp_path):
    from mpa.config import ApprovalsConfig
    with pytest.raises(Exception, match="routing_key"):
        ApprovalsConfig(store_url="sqlite:///x.db", issuer="i", jwks_url="http://j",
                        oncall_escalation={"url": "https://events.pagerduty.com/v2/enqueue"})

