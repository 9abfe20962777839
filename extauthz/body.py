"""The digest that payload-scoped approvals bind to.

Envoy sends the buffered request body (``with_request_body`` with ``pack_as_bytes``) as
``raw_body``: the gRPC length-prefixed frames. For a call with exactly one uncompressed
message, the digest is the SHA-256 of that message's serialized bytes (the 5-byte frame
header excluded), so a client can compute it from the message alone:
``hashlib.sha256(request.SerializeToString()).hexdigest()``. Anything else (no body,
several messages, a compressed or truncated frame) has no digest, so only approvals that
are not bound to a payload can match it.
"""
from __future__ import annotations

import hashlib
import struct


def grpc_message_digest(raw_body: bytes) -> str | None:
    """SHA-256 hex of the single uncompressed gRPC message in ``raw_body``, or None."""
    if len(raw_body) < 5:
        return None
    compressed, length = struct.unpack(">BI", raw_body[:5])
    if compressed != 0 or len(raw_body) != 5 + length:
        return None
    return hashlib.sha256(raw_body[5:]).hexdigest()

