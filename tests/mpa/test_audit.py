"""Audit: events are durable in the store first, then shipped as JSON lines and OpenTelemetry."""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mpa.audit import AuditShipper, JsonLinesExporter, OpenTelemetryExporter
from mpa.config import RequestPolicy
from policy.audit import AuditEvent
from tests.support.approvals_env import LEDGER, approvals_env, open_test_store

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def wait_for(check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def otel():
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    lp = LoggerProvider()
    lp.add_log_record_processor(SimpleLogRecordProcessor(logs))
    return OpenTelemetryExporter(tp, lp), spans, logs


def test_every_state_change_and_decision_is_shipped_with_trace_context(tmp_path, otel):
    exporter, spans, logs = otel
    jsonl = tmp_path / "audit.jsonl"
    rules = RequestPolicy(pending_ttl=timedelta(seconds=1))
    with approvals_env(tmp_path, rules=rules, exporters=[exporter], audit_interval=0.1,
                       config={"audit_jsonl_path": str(jsonl)}) as env:
        body = {"service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}
        approved = env.call("POST", "/api/v1/requests", A, json=body).json()["id"]
        env.call("POST", f"/api/v1/requests/{approved}/approve", B)
        rejected = env.call("POST", "/api/v1/requests", C, json=body).json()["id"]
        env.call("POST", f"/api/v1/requests/{rejected}/reject", B, json={"comment": "no ticket"})
        expiring = env.call("POST", "/api/v1/requests", B, json=body).json()["id"]
        time.sleep(1.1)
        env.server.sweep_now()
        now = datetime.now(UTC)
        # what the gateway writes when the approved call passes, and a break-glass use
        env.store.append_audit(AuditEvent(
            kind="decision.allow_with_approval", actor=A, at=now, request_id=approved,
            service=LEDGER, method="Adjust", outcome="allow", trace_id=TRACE,
            detail={"span_id": SPAN, "rule": "engineers_with_approval.approved"}))
        env.store.append_audit(AuditEvent(kind="break_glass.used", actor="dave@example.com", at=now,
                                          service=LEDGER, method="Wipe", outcome="allow",
                                          reason="INC-77", trace_id="ab" * 16))
        stored = env.store.list_audit()
        wait_for(lambda: len(spans.get_finished_spans()) >= len(stored))
        wait_for(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= len(stored))

    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    for kind in ("request.created", "request.approved", "request.rejected", "request.expired",
                 "decision.allow_with_approval", "break_glass.used"):
        assert kind in kinds, kind
    assert {x["id"] for x in lines} == {e.id for e in stored}  # every durable event, no other
    assert len(lines) == len(stored)  # and each once
    reject = next(x for x in lines if x["kind"] == "request.rejected")
    assert reject["actor"] == B and reject["request_id"] == rejected and reject["reason"] == "no ticket"
    assert next(x for x in lines if x["kind"] == "request.expired")["request_id"] == expiring

    by_kind = {s.attributes["audit.kind"]: s for s in spans.get_finished_spans()}
    decision = by_kind["decision.allow_with_approval"]
    assert format(decision.context.trace_id, "032x") == TRACE
    assert format(decision.parent.span_id, "016x") == SPAN
    assert decision.attributes["enduser.id"] == A and decision.attributes["rpc.service"] == LEDGER
    assert format(by_kind["break_glass.used"].context.trace_id, "032x") == "ab" * 16
    records = [r.log_record for r in logs.get_finished_logs()]
    assert len(records) == len(stored)
    rec = next(r for r in records if r.attributes["audit.kind"] == "decision.allow_with_approval")
    assert format(rec.trace_id, "032x") == TRACE
    assert json.loads(rec.body)["request_id"] == approved


class Flaky:
    """An exporter that is down for its first ``fail`` calls."""

    def __init__(self, fail: int) -> None:
        self.fail, self.got = fail, []

    def export(self, events):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("collector down")
        self.got.extend(events)


def _event(i: int) -> AuditEvent:
    return AuditEvent(kind="decision.deny", actor=f"user{i}@example.com",
                      at=datetime.now(UTC), service=LEDGER, method="Adjust", outcome="deny")


def test_exporter_outage_and_restart_lose_nothing_and_repeat_nothing(tmp_path):
    store = open_test_store(tmp_path)
    try:
        cursor = tmp_path / "audit.cursor"
        start = datetime.now(UTC) - timedelta(seconds=1)
        flaky = Flaky(fail=2)
        shipper = AuditShipper(store, [flaky], cursor_path=cursor, start=start)
        for i in range(3):
            store.append_audit(_event(i))
        for _ in range(2):
            with pytest.raises(ConnectionError):
                shipper.poll()
        assert len(store.list_audit(since=start)) == 3  # durable while the exporter is down
        assert shipper.poll() == 3
        assert shipper.poll() == 0
        # a new shipper process resumes from the saved cursor
        for i in range(3, 5):
            store.append_audit(_event(i))
        again = AuditShipper(store, [flaky], cursor_path=cursor)
        assert again.poll() == 2
        assert [e.actor for e in flaky.got] == [f"user{i}@example.com" for i in range(5)]
    finally:
        store.close()


def test_json_lines_exporter_appends(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    exporter = JsonLinesExporter(path)
    exporter.export([_event(1)])
    exporter.export([_event(2)])
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["actor"] for r in rows] == ["user1@example.com", "user2@example.com"]
    assert rows[0]["at"].endswith("+00:00")
