"""OpenTelemetry audit export switched on by config, end to end (issue 10, finding 6): the SDK's
OTLP gRPC exporters send to a local OTLP receiver this test starts (a gRPC LogsService and
TraceService from opentelemetry-proto), and every received log record is checked field by field
against the audit event in the store."""
from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.approvals_env import LEDGER, approvals_env

A, B = "alice@example.com", "bob@example.com"


class Receiver(logs_service_pb2_grpc.LogsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.logs: list = []
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (both services name it Export)
        with self.lock:
            if isinstance(request, logs_service_pb2.ExportLogsServiceRequest):
                self.logs.append(request)
                return logs_service_pb2.ExportLogsServiceResponse()
            self.spans.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(receiver, server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(grace=0)


def records(receiver: Receiver) -> list[tuple]:
    out = []
    with receiver.lock:
        for req in receiver.logs:
            for rl in req.resource_logs:
                resource = {a.key: a.value.string_value for a in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        out.append((resource, sl.scope.name, rec))
    return out


def test_audit_events_arrive_as_otlp_log_records_and_spans(tmp_path, otlp):
    endpoint, receiver = otlp
    config = {"otel": {"endpoint": endpoint, "insecure": True, "batch_delay_ms": 100,
                       "service_name": "approvals-under-test"}}
    with approvals_env(tmp_path, config=config, audit_interval=0.2) as env:
        r = env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411"}).json()
        assert env.call("POST", f"/api/v1/requests/{r['id']}/approve", B,
                        json={"comment": "ok"}).status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = {e.id: e for e in env.store.list_audit()}
            got = records(receiver)
            if {json.loads(rec.body.string_value)["id"] for _, _, rec in got} >= set(events):
                break
            time.sleep(0.2)
    # Every event in the store arrived exactly once (seeded grants included), field by field.
    ids = [json.loads(rec.body.string_value)["id"] for _, _, rec in got]
    assert sorted(ids) == sorted(events), (ids, list(events))
    kinds = {events[i].kind for i in ids if events[i].request_id == r["id"]}
    assert kinds == {"request.created", "request.approved"}
    for resource, scope, rec in got:
        assert resource["service.name"] == "approvals-under-test"
        assert scope == "rpcauthz.mpa.audit"
        body = json.loads(rec.body.string_value)
        e = events[body["id"]]
        assert body == json.loads(json.dumps(e.to_json(), default=str))
        assert rec.event_name == e.kind
        assert rec.time_unix_nano == int(e.at.timestamp() * 1e9)
        assert rec.severity_text == "INFO" and rec.severity_number == 9
        attrs = {a.key: a.value.string_value for a in rec.attributes}
        want = {"audit.id": e.id, "audit.kind": e.kind, "enduser.id": e.actor}
        for key, value in (("mpa.request_id", e.request_id), ("rpc.service", e.service),
                           ("rpc.method", e.method), ("mpa.outcome", e.outcome),
                           ("mpa.reason", e.reason)):
            if value:
                want[key] = value
        assert attrs == want
        assert len(rec.trace_id) == 16 and len(rec.span_id) == 8
    approved = next(rec for _, _, rec in got if rec.event_name == "request.approved")
    attrs = {a.key: a.value.string_value for a in approved.attributes}
    assert attrs["enduser.id"] == B and attrs["mpa.request_id"] == r["id"]
    assert attrs["mpa.reason"] == "ok" and attrs["mpa.outcome"] == "approved"
    spans = [s for req in receiver.spans for rs in req.resource_spans for ss in rs.scope_spans
             for s in ss.spans]
    assert sorted(s.name for s in spans) == sorted(f"audit {events[i].kind}" for i in ids)
    # each log record sits in its span
    assert {(s.trace_id, s.span_id) for s in spans} == {(rec.trace_id, rec.span_id) for _, _, rec in got}


def test_an_old_otel_proto_copy_is_named_with_its_fix():
    """xds-protos ships an older opentelemetry common_pb2 in the same place; if it won the
    install, the export refuses to start with the cause and the fix instead of an ImportError."""
    import types

    from mpa.otel_export import OTEL_PROTO_FIX, otel_proto_problem

    assert otel_proto_problem() is None  # what .ci/run installs
    old = types.SimpleNamespace(__file__="/site/opentelemetry/proto/common/v1/common_pb2.py",
                                InstrumentationLibrary=object)
    problem = otel_proto_problem(old)
    assert problem is not None and "without InstrumentationScope" in problem and "xds-protos" in problem
    assert OTEL_PROTO_FIX in problem
