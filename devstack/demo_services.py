"""Real gRPC servers for the two demo services (Accounts, Ledger), with reflection and health.

Every reply echoes what the upstream saw, so tests and the demo can check what the
gateway forwarded: the method that ran, the request's fields, and the call's metadata
(for example ``x-rpcauthz-principal`` and ``x-rpcauthz-approval`` added on allow). The
echo is JSON in the reply's ``message`` field::

    {"service": "rpcauthz.demo.v1.Ledger", "method": "GetBalance",
     "request": {"ledgerId": "L1"}, "metadata": {"x-rpcauthz-principal": "alice", ...}}

In Python::

    handle = start_demo_server()          # both services on a free 127.0.0.1 port
    ... grpc.insecure_channel(f"127.0.0.1:{handle.port}") ...
    handle.stop()

As a separate process (what ``mpactl demo`` does)::

    python -m devstack.demo_services --port 50061 --service accounts
"""
from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as v1alpha_reflection

from reflection_cache.server import SERVICE_NAMES, ReflectionServicer, add_servicer
from rpcauthz.demo.v1 import accounts_pb2, accounts_pb2_grpc, ledger_pb2, ledger_pb2_grpc

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
LEDGER = "rpcauthz.demo.v1.Ledger"
#: Short names accepted by ``services=`` and ``--service``.
SERVICES = {"accounts": ACCOUNTS, "ledger": LEDGER}
#: How many replies WatchEntries streams.
WATCH_REPLIES = 3


def echo(service: str, method: str, request, context: grpc.ServicerContext) -> str:
    """The JSON text a demo reply carries: method, request fields and received metadata."""
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata():
        if isinstance(value, bytes):  # "-bin" keys arrive as bytes
            value = base64.b64encode(value).decode()
        # Repeated keys are joined the way HTTP joins repeated headers.
        metadata[key] = f"{metadata[key]},{value}" if key in metadata else value
    return json.dumps({
        "service": service,
        "method": method,
        "request": json_format.MessageToDict(request),
        "metadata": metadata,
        "peer": context.peer(),
    }, sort_keys=True)


class AccountsServicer(accounts_pb2_grpc.AccountsServicer):
    """Every Accounts method answers with an echo of the call."""

    def _reply(self, method: str, request, context) -> accounts_pb2.AccountReply:
        return accounts_pb2.AccountReply(account_id=request.account_id,
                                         message=echo(ACCOUNTS, method, request, context))

    def ListAccounts(self, request, context):
        return self._reply("ListAccounts", request, context)

    def ReadAccount(self, request, context):
        return self._reply("ReadAccount", request, context)

    def UpdateLimits(self, request, context):
        return self._reply("UpdateLimits", request, context)

    def CloseAccount(self, request, context):
        return self._reply("CloseAccount", request, context)

    def EraseCustomerData(self, request, context):
        return self._reply("EraseCustomerData", request, context)

    def Ping(self, request, context):
        return self._reply("Ping", request, context)


class LedgerServicer(ledger_pb2_grpc.LedgerServicer):
    """Ledger methods answer with an echo; WatchEntries streams ``WATCH_REPLIES`` echoes."""

    def _reply(self, method: str, request, context) -> ledger_pb2.EntryReply:
        return ledger_pb2.EntryReply(ledger_id=request.ledger_id,
                                     message=echo(LEDGER, method, request, context))

    def GetBalance(self, request, context):
        return self._reply("GetBalance", request, context)

    def PostEntry(self, request, context):
        return self._reply("PostEntry", request, context)

    def WatchEntries(self, request, context) -> Iterator[ledger_pb2.EntryReply]:
        for _ in range(WATCH_REPLIES):
            yield self._reply("WatchEntries", request, context)


class DemoServer:
    """A running demo gRPC server: ``.port``, ``.services``, ``.address``, ``.stop()``."""

    def __init__(self, server: grpc.Server, port: int, host: str, services: tuple[str, ...],
                 health_servicer: health.HealthServicer) -> None:
        self.server = server
        self.port = port
        self.host = host
        self.services = services
        self.health = health_servicer

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 0.5) -> None:
        """Mark NOT_SERVING, then stop, waiting up to ``grace`` seconds for calls in flight."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()

    def __enter__(self) -> DemoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _full_names(services: Iterable[str]) -> tuple[str, ...]:
    names = []
    for s in services:
        key = s.strip()
        if key.lower() in SERVICES:
            names.append(SERVICES[key.lower()])
        elif key in SERVICES.values():
            names.append(key)
        else:
            raise ValueError(f"unknown demo service {s!r}; expected one of {sorted(SERVICES)}")
    if not names:
        raise ValueError("at least one demo service is needed")
    return tuple(dict.fromkeys(names))


def start_demo_server(port: int = 0, services: Iterable[str] = ("accounts", "ledger"),
                      reflection: Iterable[str] = ("v1", "v1alpha"), host: str = "127.0.0.1",
                      max_workers: int = 8) -> DemoServer:
    """Start the demo services on ``host:port`` (0 = a free port) and return a handle.

    ``services``: short names (``accounts``, ``ledger``) or full names. ``reflection``: the
    reflection protocol versions to serve, any of ``v1`` (ours) and ``v1alpha``
    (grpcio-reflection); empty for none. The gRPC health service reports SERVING for each
    service and for "" (the whole server).
    """
    names = _full_names(services)
    versions = tuple(reflection)
    unknown = [v for v in versions if v not in SERVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown reflection version(s) {unknown}; expected v1 and/or v1alpha")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    if ACCOUNTS in names:
        accounts_pb2_grpc.add_AccountsServicer_to_server(AccountsServicer(), server)
    if LEDGER in names:
        ledger_pb2_grpc.add_LedgerServicer_to_server(LedgerServicer(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listed = [*names, health.SERVICE_NAME, *(SERVICE_NAMES[v] for v in versions)]
    if "v1" in versions:
        add_servicer(server, ReflectionServicer(listed, version="v1"))
    if "v1alpha" in versions:
        v1alpha_reflection.enable_server_reflection(listed, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return DemoServer(server, bound, host, names, health_servicer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.demo_services",
        description="Run the demo gRPC services (echo replies, reflection, health).")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--service", action="append", choices=sorted(SERVICES),
                        help="service to serve; repeat for more (default: all)")
    parser.add_argument("--reflection", action="append", choices=sorted(SERVICE_NAMES),
                        help="reflection version to serve; repeat for more (default: v1 and v1alpha)")
    parser.add_argument("--no-reflection", action="store_true", help="serve no reflection at all")
    args = parser.parse_args(argv)
    reflection = () if args.no_reflection else (args.reflection or ("v1", "v1alpha"))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the "listening" line a launcher waits for
        signal.signal(sig, lambda *_: done.set())
    handle = start_demo_server(args.port, args.service or tuple(SERVICES), reflection, host=args.host)
    # One line on stdout that a launcher can parse to learn the port.
    print(f"listening {handle.address} services={','.join(handle.services)}", flush=True)
    done.wait()
    handle.stop(grace=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
