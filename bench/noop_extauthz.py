"""A no-op Envoy ext_authz server: answers every Check with OK at once (the benchmark floor).

Same stack as the real server (grpc.aio with the same server options, the default asyncio
event loop, one process, health service), no decision work.
    python bench/noop_extauthz.py --port 9101
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: E402
from google.rpc import code_pb2, status_pb2  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from extauthz.server import grpc_server_options  # noqa: E402

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                      ok_response=external_auth_pb2.OkHttpResponse())


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):  # noqa: N802
        return _OK


async def serve(port: int) -> None:
    server = grpc.aio.server(options=grpc_server_options())
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for name in ("", "envoy.service.auth.v3.Authorization"):
        await h.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    asyncio.run(serve(p.parse_args().port))
