"""Request bodies as the approver and the gateway see them: JSON in, the method's input message
out, through the same reflection the gateway reads modes with.

``mpa request rpc METHOD --body JSON`` sends the body as JSON; :class:`ReflectedBodies` finds the
method's input type from the service's reflection (the ``reflection:`` settings the gateway
uses), builds the message (an unknown field or a wrong type is refused, naming it) and
serializes it deterministically; the request is then bound to the SHA-256 of those bytes, which
is what the gateway computes from the call's gRPC message. A client sending the same message
(proto serialization in field order, as gRPC libraries do) matches it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from policy import InvalidRequest

#: Builds the input message of ``service``/``method`` from JSON. Raises on failure.
BodyEncoder = Callable[[str, str, dict[str, Any]], Awaitable[Message]]


#: The most of a call's JSON an approver is shown (the rest is cut with a note).
VIEW_CAP = 4096
REDACTED = "[REDACTED]"


def redacted_json(msg: Message) -> Any:
    """The message as proto3 JSON, every field marked ``[debug_redact = true]`` masked (at any
    depth, in repeated fields too)."""
    out = json_format.MessageToDict(msg, preserving_proto_field_name=False)
    return _redact(msg, out)


def _redact(msg: Message, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    for field, value in msg.ListFields():
        key = field.json_name
        if key not in data:
            continue
        if field.GetOptions().debug_redact:
            data[key] = REDACTED
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.is_repeated:
                data[key] = [_redact(m, d) for m, d in zip(value, data[key], strict=False)]
            else:
                data[key] = _redact(value, data[key])
    return data


def body_view(msg: Message, cap: int = VIEW_CAP) -> str:
    """What the approver reads: the redacted JSON, pretty-printed and cut at ``cap`` characters."""
    text = json.dumps(redacted_json(msg), indent=2, sort_keys=True)
    if len(text) > cap:
        text = text[:cap] + f"\n... (cut: {len(text)} characters in all)"
    return f"{msg.DESCRIPTOR.full_name} {text}"


def body_digest(msg: Message) -> str:
    """The SHA-256 hex of the message's deterministic serialization (what the gateway binds)."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


def reflected_bodies(factory: Callable[[], Any]) -> BodyEncoder:
    """An encoder over a reflection cache built on first use (inside the server's event loop,
    as gRPC aio requires), e.g. ``reflected_bodies(lambda: ReflectionCache.from_settings(s))``."""
    holder: list[Any] = []

    async def encode(service: str, method: str, body: dict[str, Any]) -> Message:
        from reflection_cache.client import build_pool
        if not holder:
            holder.append(factory())
        cache = holder[0]
        endpoint = cache.resolver.resolve(service)
        files = await cache.client.fetch_files(service, endpoint)
        pool = build_pool(files, f"service {service}")
        try:
            desc = pool.FindServiceByName(service).methods_by_name[method]
        except KeyError:
            raise InvalidRequest(f"/{service}/{method}: no such method in the service's "
                                 "reflection") from None
        cls = message_factory.GetMessageClass(desc.input_type)
        try:
            return json_format.ParseDict(body, cls())
        except json_format.ParseError as e:
            raise InvalidRequest(f"the body is not a valid {desc.input_type.full_name}: {e}") from None
    return encode


__all__ = ["BodyEncoder", "body_digest", "reflected_bodies"]
