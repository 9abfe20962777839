"""Reflection endpoints that misbehave, for the fail-closed tests.

``closed_port()`` nothing listens; ``SilentListener`` accepts TCP and never answers (a hung
service); ``start_malformed_reflection()`` is a real gRPC server whose reflection service
(v1 and v1alpha) answers every question with bytes that are not a FileDescriptorProto.
"""
from __future__ import annotations

import socket
import threading
from concurrent import futures

import grpc
from grpc_reflection.v1alpha import reflection_pb2

from devstack.processes import free_port

_METHODS = ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def closed_port() -> str:
    return f"127.0.0.1:{free_port()}"


class SilentListener:
    """Accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
                self._conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for c in self._conns:
            c.close()
        self._sock.close()


def _garbage(request_iterator, context):
    for req in request_iterator:
        yield reflection_pb2.ServerReflectionResponse(
            valid_host=req.host, original_request=req,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[b"\xff\xfe this is not a FileDescriptorProto"]))


class _Handler(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method in _METHODS:
            return grpc.stream_stream_rpc_method_handler(
                _garbage, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        return None


class MalformedReflection:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((_Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)
