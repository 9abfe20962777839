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
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from policy import InvalidRequest
from policy.body_view import REDACTED, VIEW_CAP, body_view, redacted_json

#: Builds the input message of ``service``/``method`` from JSON. Raises on failure.
BodyEncoder = Callable[[str, str, dict[str, Any]], Awaitable[Message]]


def body_digest(msg: Message) -> str:
    """The SHA-256 hex of the message's deterministic serialization (what the gateway binds)."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


def reflected_bodies(factory: Callable[[], Any]) -> BodyEncoder:
    """An encoder over a reflection cache built on first use (inside the server's event loop,
    as gRPC aio requires), e.g. ``reflected_bodies(lambda: ReflectionCache.from_settings(s))``."""
    holder: list[Any] = []

    async def encode(service: str, method: str, body: dict[str, Any]) -> Message:
        from reflection_cache.types import UnknownMethod
        if not holder:
            holder.append(factory())
        try:
            input_type = await holder[0].method_input_type(service, method)
        except UnknownMethod as e:
            raise InvalidRequest(str(e)) from None
        cls = message_factory.GetMessageClass(input_type)
        try:
            return json_format.ParseDict(body, cls())
        except json_format.ParseError as e:
            raise InvalidRequest(f"the body is not a valid {input_type.full_name}: {e}") from None
    return encode


__all__ = ["REDACTED", "VIEW_CAP", "BodyEncoder", "body_digest", "body_view", "redacted_json",
           "reflected_bodies"]
