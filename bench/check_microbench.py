"""What does one decision cost inside the server, against a handler that does nothing?

In one process and one event loop, with the real parts the server uses (SQLite store,
grants in memory, the reflection cache warmed against the real demo service, the audit
writer writing every allow to the store in the background), this times

  noop      decode the CheckRequest bytes, return a prebuilt OK, encode it
  rpcauthz  decode, ``Authorizer.check`` (a warm ENGINEERS_WITHOUT_APPROVAL allow), encode

The request is shaped like the one Envoy sends through envoy/gateway.yaml (headers,
addresses, the jwt_authn payload in metadata_context, the raw body). Decoding and encoding
are included because grpc.aio does them for either server. Runs alternate (ABAB...) and
the median of the rounds is reported, so noise from other work on the machine hits both.

    python bench/check_microbench.py                       # 7 rounds of 3000 checks
    python bench/check_microbench.py --profile             # plus a cProfile of our path
    python bench/check_microbench.py --no-audit-allows     # audit.allows: false
    python bench/check_microbench.py --audit-spool         # the server's default: spool first
    python bench/check_microbench.py --audit-spool --spool-no-fsync   # audit.spool_fsync: false
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from google.rpc import code_pb2, status_pb2  # noqa: E402

from tests.support.grpc_frames import frame  # noqa: E402

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
PATH = f"/{ACCOUNTS}/ListAccounts"
PRINCIPAL = "bench-engineer"

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                      ok_response=external_auth_pb2.OkHttpResponse())


def envoy_like_request(principal: str = PRINCIPAL, path: str = PATH) -> bytes:
    """A serialized CheckRequest like the one Envoy sends for a gRPC call with a token."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address, a.source.address.socket_address.port_value = "127.0.0.1", 53124
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 10000
    a.request.time.GetCurrentTime()
    http = a.request.http
    http.id, http.method, http.path, http.host = "1234567890123456789", "POST", path, "127.0.0.1:10000"
    http.scheme, http.protocol = "http", "HTTP/2"
    body = frame(b"\x0a\x03A-1")
    http.raw_body, http.size = body, len(body)
    for k, v in {":authority": "127.0.0.1:10000", ":path": path, ":method": "POST",
                 ":scheme": "http", "content-type": "application/grpc", "te": "trailers",
                 "user-agent": "grpc-python/1.70.0 grpc-c/45.0.0 (linux; chttp2)",
                 "grpc-accept-encoding": "identity, deflate, gzip",
                 "x-forwarded-proto": "http", "x-request-id": "0b6a1f0e-7a0e-4b5e-9c1d-2f4a5b6c7d8e",
                 "x-envoy-expected-rq-timeout-ms": "30000"}.items():
        http.headers[k] = v
    payload = struct_pb2.Struct()
    payload.update({"jwt_payload": {"sub": principal, "iss": "https://dev-issuer.rpcauthz.local",
                                    "aud": "rpcauthz", "iat": 1.7e9, "exp": 1.7e9 + 3600,
                                    "jti": "f" * 32}})
    a.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    return req.SerializeToString()


async def time_handler(handler, raw: bytes, n: int, concurrency: int,
                       settle=None) -> tuple[float, float]:
    """(wall, CPU) seconds per check: ``n`` checks, ``concurrency`` at a time, each decoded,
    handled and encoded. CPU is the whole process's (every thread), up to the end of
    ``settle()`` (waiting for the audit writer), so background work is counted."""
    decode = external_auth_pb2.CheckRequest.FromString

    async def one() -> None:
        resp = await handler(decode(raw))
        resp.SerializeToString()

    cpu, started = time.process_time(), time.perf_counter()
    if concurrency == 1:
        for _ in range(n):
            await one()
    else:
        for _ in range(n // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if settle is not None:
        await settle()
    return wall / n, (time.process_time() - cpu) / n


async def run(args) -> int:
    from devstack.demo_services import start_demo_server
    from extauthz.audit_spool import AuditSpool
    from extauthz.audit_writer import AuditWriter
    from extauthz.config import load_settings
    from extauthz.metrics import Metrics
    from extauthz.pipeline import Authorizer
    from extauthz.server import open_components
    from extauthz.spooled_audit import SpooledAuditWriter
    from policy import Grant, Role
    from policy.stores import open_store

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-microbench-"))
    upstream = start_demo_server(services=("accounts",))
    store_url = f"sqlite:///{workdir / 'bench.db'}"
    s = open_store(store_url)
    s.put_grant(Grant(PRINCIPAL, Role.ENGINEER))
    s.close()
    settings = load_settings(env={}, overrides={
        "store_url": store_url, "audit": {"allows": not args.no_audit_allows},
        "reflection": {"endpoints": {"static": {ACCOUNTS: upstream.address}}}})
    components = await open_components(settings)
    metrics = Metrics()
    audit: AuditWriter | SpooledAuditWriter
    if args.audit_spool:  # as the server runs by default: each check waits for its fsync'd group
        spool = AuditSpool(str(workdir / "audit-spool.db"), settings.audit.spool_max_events,
                           fsync=not args.spool_no_fsync)
        audit = SpooledAuditWriter(components.store, metrics, spool, settings.audit.queue_size,
                                   batch_window=settings.audit.batch_window_ms / 1000.0)

        async def settle_audit() -> None:
            await audit.acknowledged()
            while spool.stats()["depth"]:
                await asyncio.sleep(0.01)
    else:
        audit = AuditWriter(components.store, metrics, settings.audit.queue_size,
                            batch_window=settings.audit.batch_window_ms / 1000.0)

        async def settle_audit() -> None:
            await audit._queue.join()
    audit.start()
    authorizer = Authorizer(settings, store=components.store, grants=components.grants,
                            modes=components.modes, audit=audit, metrics=metrics)

    async def noop(_req):
        return _OK

    raw = envoy_like_request()
    try:
        first = await authorizer.check(external_auth_pb2.CheckRequest.FromString(raw))
        if first.status.code != code_pb2.OK:
            raise RuntimeError(f"the warm-up check was not an allow: {first}")
        rows = []
        for c in args.concurrency:
            walls: dict[str, list[float]] = {"noop": [], "rpcauthz": []}
            cpus: dict[str, list[float]] = {"noop": [], "rpcauthz": []}
            for _ in range(args.rounds):  # ABAB: noise hits both alike
                for name, handler, settle in (("noop", noop, None),
                                              ("rpcauthz", authorizer.check, settle_audit)):
                    wall, cpu = await time_handler(handler, raw, args.checks, c, settle)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            rows.append((c, walls, cpus))
        print("| concurrency | noop wall (µs/check) | rpcauthz wall (µs/check) | rpcauthz wall range "
              "| noop CPU (µs/check) | rpcauthz CPU (µs/check) | extra CPU (µs/check) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c, walls, cpus in rows:
            med = {k: statistics.median(v) * 1e6 for k, v in walls.items()}
            cmed = {k: statistics.median(v) * 1e6 for k, v in cpus.items()}
            print(f"| {c} | {med['noop']:.1f} | {med['rpcauthz']:.1f} "
                  f"| {min(walls['rpcauthz']) * 1e6:.1f}-{max(walls['rpcauthz']) * 1e6:.1f} "
                  f"| {cmed['noop']:.1f} | {cmed['rpcauthz']:.1f} | {cmed['rpcauthz'] - cmed['noop']:.1f} |")
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            await time_handler(authorizer.check, raw, args.checks, 1, settle_audit)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    finally:
        await audit.close()
        if components.close is not None:
            await components.close()
        upstream.stop(grace=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=3000, help="checks per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--no-audit-allows", action="store_true")
    ap.add_argument("--audit-spool", action="store_true",
                    help="spool first (the server's default): each check waits for its fsync'd group")
    ap.add_argument("--spool-no-fsync", action="store_true",
                    help="with --audit-spool: audit.spool_fsync: false (survives kill -9, not a host crash)")
    ap.add_argument("--profile", action="store_true")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
