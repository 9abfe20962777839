"""What an approver reads of a body-bound request's call: the message as JSON, every field
marked ``[debug_redact = true]`` masked, size-capped. Pure (no I/O): the approvals service
(``mpa request rpc --body``) and the gateway (requests it opens for a call with a body) build
the same view from a decoded message."""
from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

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


__all__ = ["REDACTED", "VIEW_CAP", "body_view", "redacted_json"]
