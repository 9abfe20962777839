"""An access log service that only drains: Envoy's ALS stream read message by message as
bytes, nothing parsed, kept or audited. bench/fast_path_attribution.py points a gateway's
fast-path access log here (``audit_als_sink``) to price what ALS costs Envoy itself, apart
from what our receiver does with the entries.

    python bench/als_sink.py PORT      # serves on 127.0.0.1:PORT until stopped (gRPC health: SERVING)
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

SERVICE = "envoy.service.accesslog.v3.AccessLogService"


def _drain(messages: Iterator[bytes], _context: Any) -> bytes:
    for _ in messages:
        pass
    return b""  # StreamAccessLogsResponse has no fields: its encoding is empty


def serve(port: int) -> grpc.Server:
    """The sink, started, on 127.0.0.1:``port``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(_drain)}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "": SERVING
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


if __name__ == "__main__":
    serve(int(sys.argv[1])).wait_for_termination()
