"""gRPC wire framing for tests and benchmarks that build Envoy-shaped CheckRequests."""
from __future__ import annotations

import struct


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC frame holding ``message`` (what a client puts on the wire)."""
    return struct.pack(">BI", 0, len(message)) + message
