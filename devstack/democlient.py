"""A tiny gRPC client for the demo: call any method by path through the gateway.

It is an ordinary grpcio client: it builds the request message from the descriptors of
the generated code it can import (the demo services' ``*_pb2`` modules), sends the bearer
token, and reports the gRPC status, message and the ``x-mpa-request-url`` header.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory

# Importing the generated modules registers their services in the default descriptor pool.
from rpcauthz.demo.v1 import accounts_pb2, ledger_pb2

#: The services the client can call (those of the generated modules imported above).
KNOWN_SERVICES = tuple(sorted(s.full_name for m in (accounts_pb2, ledger_pb2)
                              for s in m.DESCRIPTOR.services_by_name.values()))


@dataclasses.dataclass
class CallResult:
    code: grpc.StatusCode
    message: str
    request_url: str | None
    replies: list[dict[str, Any]]

    def render(self) -> str:
        lines = [f"status: {self.code.name} ({self.code.value[0]})"]
        if self.message:
            lines.append(f"message: {self.message}")
        if self.request_url:
            lines.append(f"x-mpa-request-url: {self.request_url}")
        for r in self.replies:
            lines.append(f"reply: {json.dumps(r, sort_keys=True)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The result as ``mpactl demo call --json`` prints it."""
        return {"status": self.code.name, "code": self.code.value[0], "message": self.message,
                "request_url": self.request_url, "replies": self.replies}


def _method(path: str):
    parts = path.strip("/").split("/")
    if len(parts) != 2:
        raise ValueError(f"{path!r} is not /package.Service/Method, e.g. /{KNOWN_SERVICES[0]}/...")
    try:
        service = descriptor_pool.Default().FindServiceByName(parts[0])
    except KeyError:
        raise ValueError(f"unknown service {parts[0]!r}; known: "
                         + ", ".join(KNOWN_SERVICES)) from None
    method = service.methods_by_name.get(parts[1])
    if method is None:
        raise ValueError(f"{parts[0]} has no method {parts[1]!r}; it has "
                         + ", ".join(sorted(service.methods_by_name)))
    return method


def call(gateway: str, path: str, *, token: str | None, data: dict[str, Any] | None = None,
         timeout: float = 10.0, extra_metadata: list[tuple[str, str]] | None = None) -> CallResult:
    """Call ``path`` on ``gateway`` (host:port) with ``data`` as the request (JSON fields)."""
    method = _method(path)
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict(data or {}, request_cls())
    metadata = list(extra_metadata or [])
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    with grpc.insecure_channel(gateway) as channel:
        kwargs = dict(request_serializer=lambda m: m.SerializeToString(),
                      response_deserializer=reply_cls.FromString)
        replies: list[dict[str, Any]] = []
        try:
            if method.server_streaming:
                stream = channel.unary_stream(path, **kwargs)(request, timeout=timeout, metadata=tuple(metadata))
                for reply in stream:
                    replies.append(json_format.MessageToDict(reply))
                return CallResult(grpc.StatusCode.OK, "", None, replies)
            reply = channel.unary_unary(path, **kwargs)(request, timeout=timeout, metadata=tuple(metadata))
            return CallResult(grpc.StatusCode.OK, "", None, [json_format.MessageToDict(reply)])
        except grpc.RpcError as e:
            md: dict[str, str | bytes] = {}
            # What a call raises is also the call; grpc's stubs declare the two incompatible,
            # so the check goes through `object` to stay type-checked.
            failed: object = e
            if isinstance(failed, grpc.Call):
                md = dict(failed.trailing_metadata() or ()) | dict(failed.initial_metadata() or ())
            url = md.get("x-mpa-request-url")
            return CallResult(e.code(), e.details() or "", url if isinstance(url, str) else None, replies)
