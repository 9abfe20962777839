"""Our v1 reflection servicer answers every question as grpcio-reflection's v1alpha one does."""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_reflection.v1alpha import reflection as v1alpha_reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from reflection_cache.server import SERVICE_NAMES, ReflectionServicer, add_reflection, add_servicer
from reflection_cache.v1 import reflection_pb2 as v1_pb2
from reflection_cache.v1 import reflection_pb2_grpc as v1_grpc
from rpcauthz.demo.v1 import accounts_pb2  # noqa: F401  (registers the demo files in the default pool)

NAMES = ["rpcauthz.demo.v1.Accounts"]
QUESTIONS = [
    dict(list_services=""),
    dict(file_by_filename="rpcauthz/demo/v1/accounts.proto"),
    dict(file_by_filename="no/such.proto"),
    dict(file_containing_symbol="rpcauthz.demo.v1.Accounts.CloseAccount"),
    dict(file_containing_symbol="rpcauthz.demo.v1.AccountReply"),
    dict(file_containing_symbol="no.such.Symbol"),
    dict(file_containing_extension=dict(containing_type="google.protobuf.MethodOptions",
                                        extension_number=51234)),
    dict(file_containing_extension=dict(containing_type="google.protobuf.MethodOptions",
                                        extension_number=9)),
    dict(all_extension_numbers_of_type="google.protobuf.ServiceOptions"),
    dict(all_extension_numbers_of_type="no.such.Message"),
]


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    listed = NAMES + [SERVICE_NAMES["v1"], SERVICE_NAMES["v1alpha"]]
    add_servicer(srv, ReflectionServicer(listed, version="v1"))
    v1alpha_reflection.enable_server_reflection(listed, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(0).wait()


def _ask(address, pb2, stubs):
    with grpc.insecure_channel(address) as ch:
        return list(stubs.ServerReflectionStub(ch).ServerReflectionInfo(
            iter(pb2.ServerReflectionRequest(**q) for q in QUESTIONS), timeout=5))


def test_v1_answers_match_grpcio_reflection_v1alpha(server):
    ours = _ask(server, v1_pb2, v1_grpc)
    theirs = _ask(server, v1alpha_pb2, v1alpha_grpc)
    assert len(ours) == len(theirs) == len(QUESTIONS)
    for question, a, b in zip(QUESTIONS, ours, theirs, strict=True):
        # Same field numbers, so the bytes of the two versions' answers are comparable.
        a_alpha = v1alpha_pb2.ServerReflectionResponse.FromString(a.SerializeToString())
        kind = a_alpha.WhichOneof("message_response")
        assert kind == b.WhichOneof("message_response"), question
        if kind == "error_response":
            assert a_alpha.error_response.error_code == b.error_response.error_code == \
                grpc.StatusCode.NOT_FOUND.value[0]
        elif kind == "file_descriptor_response":
            assert sorted(a_alpha.file_descriptor_response.file_descriptor_proto) == \
                sorted(b.file_descriptor_response.file_descriptor_proto), question
        else:
            assert getattr(a_alpha, kind) == getattr(b, kind), question
    assert 51235 in ours[8].all_extension_numbers_response.extension_number


def test_empty_question_is_invalid_argument(server):
    with grpc.insecure_channel(server) as ch:
        [answer] = v1_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([v1_pb2.ServerReflectionRequest(host="x")]), timeout=5)
    assert answer.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_unknown_version_is_refused():
    with pytest.raises(ValueError, match="unknown reflection version 'v2'"):
        add_reflection(grpc.server(futures.ThreadPoolExecutor(max_workers=1)), NAMES, versions=("v2",))


def test_add_reflection_lists_the_reflection_services_it_adds():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    [v1] = add_reflection(srv, NAMES, versions=("v1",))
    assert v1.service_names == ("grpc.reflection.v1.ServerReflection", "rpcauthz.demo.v1.Accounts")
