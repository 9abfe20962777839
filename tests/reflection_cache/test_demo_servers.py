"""The demo gRPC servers: echo replies, streaming, health, reflection in both versions, CLI."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from devstack.demo_services import WATCH_REPLIES, start_demo_server
from reflection_cache.v1 import reflection_pb2 as v1_pb2
from reflection_cache.v1 import reflection_pb2_grpc as v1_grpc
from rpcauthz.demo.v1 import accounts_pb2, accounts_pb2_grpc, ledger_pb2, ledger_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def demo():
    handle = start_demo_server()
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def test_unary_reply_echoes_method_request_and_metadata(demo):
    with grpc.insecure_channel(demo.address) as ch:
        reply = accounts_pb2_grpc.AccountsStub(ch).CloseAccount(
            accounts_pb2.AccountRequest(account_id="A-1", note="bye"),
            metadata=[("x-rpcauthz-principal", "alice@example.com"), ("x-rpcauthz-approval", "req-42")],
            timeout=5)
    assert reply.account_id == "A-1"
    seen = json.loads(reply.message)
    assert seen["service"] == "rpcauthz.demo.v1.Accounts"
    assert seen["method"] == "CloseAccount"
    assert seen["request"] == {"accountId": "A-1", "note": "bye"}
    assert seen["metadata"]["x-rpcauthz-principal"] == "alice@example.com"
    assert seen["metadata"]["x-rpcauthz-approval"] == "req-42"


def test_watch_entries_streams_several_echoes(demo):
    with grpc.insecure_channel(demo.address) as ch:
        replies = list(ledger_pb2_grpc.LedgerStub(ch).WatchEntries(
            ledger_pb2.EntryRequest(ledger_id="L-9", amount_minor_units=125), timeout=5))
    assert len(replies) == WATCH_REPLIES > 1
    for r in replies:
        seen = json.loads(r.message)
        assert (r.ledger_id, seen["method"]) == ("L-9", "WatchEntries")
        assert seen["request"]["amountMinorUnits"] == "125"


def test_health_reports_each_service(demo):
    with grpc.insecure_channel(demo.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "rpcauthz.demo.v1.Accounts", "rpcauthz.demo.v1.Ledger"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert e.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("pb2,stubs", [(v1_pb2, v1_grpc), (v1alpha_pb2, v1alpha_grpc)],
                         ids=["v1", "v1alpha"])
def test_reflection_lists_services_and_returns_option_files(demo, pb2, stubs):
    with grpc.insecure_channel(demo.address) as ch:
        stub = stubs.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([
            pb2.ServerReflectionRequest(list_services=""),
            pb2.ServerReflectionRequest(file_containing_symbol="rpcauthz.demo.v1.Ledger"),
            pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
        ]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"rpcauthz.demo.v1.Accounts", "rpcauthz.demo.v1.Ledger"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[1].file_descriptor_response.file_descriptor_proto]
    assert files[0].name == "rpcauthz/demo/v1/ledger.proto"
    assert "rpcauthz/v1/options.proto" in {f.name for f in files}
    assert answers[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_only_the_requested_service_and_reflection_version_are_served():
    handle = start_demo_server(services=("ledger",), reflection=("v1alpha",))
    try:
        with grpc.insecure_channel(handle.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                accounts_pb2_grpc.AccountsStub(ch).Ping(accounts_pb2.AccountRequest(), timeout=5)
            assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as e:
                list(v1_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([v1_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        handle.stop(grace=0)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown demo service 'billing'"):
        start_demo_server(services=("billing",))
    with pytest.raises(ValueError, match="v2"):
        start_demo_server(reflection=("v2",))


def test_cli_runs_one_service_as_a_process(port):
    proc = subprocess.Popen([sys.executable, "-m", "devstack.demo_services", "--port", str(port),
                             "--service", "accounts"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line and "Accounts" in line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = accounts_pb2_grpc.AccountsStub(ch).Ping(
                accounts_pb2.AccountRequest(account_id="p"), timeout=5)
        assert json.loads(reply.message)["method"] == "Ping"
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
