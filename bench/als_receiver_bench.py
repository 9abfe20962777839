"""What does our server spend, in CPU, per fast-path allow it audits (issue 12)?

Envoy's ``http_grpc`` access log streams each fast-path allow to our server
(``extauthz/access_log.py``), which turns it into one ``decision.allow`` event, spools it
(fsync'd) and ships it to the store. This bench feeds GENUINE Envoy messages through the real
``AccessLogService`` in this process, with a real spool on disk and a real store, and prints the
CPU it takes per entry, stage by stage and end to end.

1. Capture: the demo gateway rendered with the fast path (``render_gateway(fast_path=True)``, the
   1 s / 1 MiB buffer, RBAC over ADS from a real ext_authz server of ours), driven by h2load,
   with only its ``http_grpc`` access log pointed at a capturing gRPC server in this process
   (the raw ``StreamAccessLogsMessage`` bytes Envoy 1.40 sends, kept as they are). ``--save``
   keeps them in a file, ``--load`` replays one (no Envoy needed).
2. Replay, in interleaved rounds: at N = the captured messages (Envoy's own batches, N = entries
   per message) and at N = 16 (the same entries cut into messages of 16), each stream through
   ``AccessLogService.StreamAccessLogs`` until every event is durable (written straight to the
   store while it answers, ``SpooledAuditWriter.write_rows``; or fsync'd in the spool), then the
   ship of whatever the spool holds to the store until the spool is empty. Each round uses its
   own Envoy node id, so every event id is new (no round is sped up by the dedupe of the one
   before). ``--compare`` runs each case a second time with the spool forced
   (``direct_timeout=0``: the store down path, and the design before the direct write).

CPU is ``time.process_time()`` (every thread of this process: the spool and the ship run in an
executor), per entry, median over rounds; the baseline in the same run is parsing the messages
alone (what gRPC does before our code sees one), so the ``vs parse`` column is robust to the
machine's load. Stages: ``parse``; ``read`` (entries to spool rows, without writing);
``receive`` (the service end to end: parse, read, durable in the store or the spool); ``ship``
(what the spool holds to the store, removed from the spool; nothing while the store answers);
``end to end`` = receive + ship.

    python bench/als_receiver_bench.py                       # capture, then 5 rounds
    python bench/als_receiver_bench.py --save /tmp/als.bin   # keep the capture
    python bench/als_receiver_bench.py --load /tmp/als.bin --repeat 9
    python bench/als_receiver_bench.py --pg-dsn postgresql://postgres@127.0.0.1:5432/test
    python bench/als_receiver_bench.py --load /tmp/als.bin --compare   # also the spool path

Robust to the machine's load: user-space instructions per entry, under valgrind (the same with
``--repeat 1`` subtracted, divided by 2 rounds x the entries)::

    valgrind --tool=cachegrind --cache-sim=no python bench/als_receiver_bench.py --load /tmp/als.bin \
        --only big --end-to-end-only --repeat 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402

STREAM_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
ALS_CLUSTER = "als_capture"


# --- capture ---------------------------------------------------------------------------------------

class _Capture(grpc.GenericRpcHandler):  # type: ignore[misc]
    """An AccessLogService that keeps each message's bytes as Envoy sent them."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._lock = threading.Lock()

    def service(self, details: Any) -> Any:
        if details.method != STREAM_METHOD:
            return None
        return grpc.stream_unary_rpc_method_handler(self._stream)  # no deserializer: raw bytes

    def _stream(self, request_iterator: Any, context: Any) -> bytes:
        for raw in request_iterator:
            with self._lock:
                self.messages.append(bytes(raw))
        return b""  # an empty StreamAccessLogsResponse


def _to_capture(cfg: dict[str, Any], port: int) -> dict[str, Any]:
    """The rendered fast-path gateway with its ``http_grpc`` access log sent to ``port``
    (a copy of the ext_authz cluster, without its health check); nothing else changed."""
    out = json.loads(json.dumps(cfg))
    clusters = out["static_resources"]["clusters"]
    ext = next(c for c in clusters if c["name"] == "ext_authz")
    cap = json.loads(json.dumps(ext))
    cap["name"] = cap["load_assignment"]["cluster_name"] = ALS_CLUSTER
    cap.pop("health_checks", None)
    cap.pop("outlier_detection", None)
    cap["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": port}}}}]}]
    clusters.append(cap)
    moved = 0
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for a in f.get("typed_config", {}).get("access_log", []):
                    if a["name"] == "envoy.access_loggers.http_grpc":
                        a["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = ALS_CLUSTER
                        moved += 1
    if not moved:
        raise ValueError("the rendered gateway has no http_grpc access log")
    return out


def capture(duration: float, concurrency: int) -> list[bytes]:
    """Genuine ``StreamAccessLogsMessage`` bytes from Envoy, the demo gateway as rendered with
    the fast path, ``concurrency`` h2load streams for ``duration`` seconds."""
    from bench.fast_path_bench import ENGINEER, demo_gateway, running_fast_path_server, until_fast
    from bench.gateway_bench import check_call, demo_backends, run_h2load, stop_all
    from devstack.processes import EnvoyProcess

    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-alsbench-"))
    things: list[Any] = []
    cap = _Capture()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[cap])
    cap_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        issuer, jwks, upstream, body = demo_backends(workdir, things)
        token = issuer.mint(ENGINEER, ttl_seconds=3600)
        ours = running_fast_path_server(workdir, upstream.address, things)
        ours_port = ours.port
        cfg = demo_gateway(jwks.port, upstream.port, ours_port, fast_path=True)
        envoy = EnvoyProcess(_to_capture(cfg, cap_port), workdir / "envoy", name="envoy-fast", concurrency=1)
        things.append(envoy)
        envoy.wait_ready()
        check_call(envoy.port, token)
        until_fast(envoy, token)
        run_h2load(envoy.port, token, body, concurrency, duration, 0.5, workdir, "capture")
        deadline = time.monotonic() + 5  # the 1 s flush interval
        allowed_stat = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
        while True:
            allowed = int(envoy.stats(allowed_stat).get(allowed_stat) or 0)
            got = sum(len(als_pb2.StreamAccessLogsMessage.FromString(m).http_logs.log_entry)
                      for m in cap.messages)
            if got >= allowed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return list(cap.messages)
    finally:
        server.stop(None)
        stop_all(things, workdir)


def save(path: str, messages: Sequence[bytes]) -> None:
    """``messages`` as length-prefixed records (u32 big-endian + bytes)."""
    with open(path, "wb") as f:
        for m in messages:
            f.write(struct.pack(">I", len(m)) + m)


def load(path: str) -> list[bytes]:
    """The messages ``save`` wrote."""
    data = pathlib.Path(path).read_bytes()
    out, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from(">I", data, at)
        out.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return out


# --- replay ----------------------------------------------------------------------------------------

def streams(raw: Sequence[bytes], n: int | None) -> tuple[str, list[bytes]]:
    """One stream of the captured entries: Envoy's own messages (``n`` None) or the same
    entries re-cut into messages of ``n``; the first names the log, as Envoy's first does.
    Returns (log name, messages as bytes)."""
    msgs = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in raw]
    ident = next(m.identifier for m in msgs if m.HasField("identifier"))
    entries = [e for m in msgs for e in m.http_logs.log_entry]
    if n is None:
        batches = [list(m.http_logs.log_entry) for m in msgs if m.http_logs.log_entry]
    else:
        batches = [entries[i:i + n] for i in range(0, len(entries), n)]
    out = []
    for i, b in enumerate(batches):
        m = als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=b))
        if i == 0:
            m.identifier.CopyFrom(ident)
        out.append(m.SerializeToString())
    return ident.log_name, out


def _renamed(first: bytes, node: str) -> bytes:
    """``first`` (a stream's first message) with its Envoy node id set to ``node``."""
    m = als_pb2.StreamAccessLogsMessage.FromString(first)
    m.identifier.node.id = node
    return m.SerializeToString()


class Rig:
    """The real AccessLogService with a real spool and store, as extauthz/server.py wires them."""

    def __init__(self, workdir: pathlib.Path, store_url: str, log_name: str, spool_only: bool = False) -> None:
        from extauthz.access_log import AccessLogService
        from extauthz.audit_spool import AuditSpool
        from extauthz.config import Settings
        from extauthz.metrics import Metrics
        from extauthz.spooled_audit import SpooledAuditWriter
        from policy.stores import open_store

        self.settings = Settings(store_url=store_url, fast_path={"enabled": True, "log_name": log_name})
        self.store = open_store(store_url)
        self.spool = AuditSpool(str(workdir / f"spool{'-only' if spool_only else ''}.db"), 1_000_000)
        self.metrics = Metrics()
        self.executor = futures.ThreadPoolExecutor(max_workers=2)
        a = self.settings.audit
        self.writer = SpooledAuditWriter(self.store, self.metrics, self.spool, a.queue_size, self.executor,
                                         ack_timeout=60.0, direct_timeout=0.0 if spool_only else 60.0)
        self.service = AccessLogService(self.settings, self.writer, self.metrics)

    def start(self) -> None:
        """Start the writer's spooler, not its shipper: this bench ships by itself, a stage apart."""
        self.writer.start()
        for t in list(self.writer._tasks):
            if t.get_name() == "audit-shipper":
                t.cancel()

    async def receive(self, messages: Sequence[bytes]) -> None:
        """Every message through the service (parsed as gRPC would), until its events are spooled."""
        async def it() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
            for raw in messages:
                yield als_pb2.StreamAccessLogsMessage.FromString(raw)
        await self.service.StreamAccessLogs(it(), None)

    def ship(self) -> int:
        return self.writer.replay_once()

    def audited(self) -> int:
        """Entries the service took as audited so far (durable in the store or the spool)."""
        return int(self.metrics.registry.get_sample_value("rpcauthz_fast_path_entries_total",
                                                          {"result": "audited"}) or 0)

    async def close(self) -> None:
        for t in self.writer._tasks:
            t.cancel()
        self.spool.close()
        self.store.close()
        self.executor.shutdown()


def _reader(rig: Rig) -> Callable[[als_pb2.StreamAccessLogsMessage, str], Any]:
    """Entries to what the spool stores, without writing (the ``read`` stage). Also runs
    against the code before ``EntryReader`` (an entry at a time), for a before/after."""
    from extauthz import access_log, audit_spool

    def refused(entry: Any, e: Exception) -> None:
        raise RuntimeError(f"a captured entry was refused: {e}")
    if hasattr(access_log, "EntryReader"):
        reader = access_log.EntryReader(rig.settings)
        return lambda m, node: reader.rows(m.http_logs.log_entry, node, refused)
    encode = audit_spool._to_json  # type: ignore[attr-defined]  # the code before event_json
    return lambda m, node: [encode(access_log.read_entry(e, rig.settings, node).audit_event())
                            for e in m.http_logs.log_entry]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture-seconds", type=float, default=4.0, help="h2load time for the capture")
    ap.add_argument("--capture-concurrency", type=int, default=16)
    ap.add_argument("--save", help="keep the captured messages in this file")
    ap.add_argument("--load", help="replay messages saved with --save (no capture)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; cells are medians")
    ap.add_argument("--small", type=int, default=16, help="entries per message of the small case")
    ap.add_argument("--pg-dsn", help="ship into PostgreSQL at this DSN instead of a SQLite file")
    ap.add_argument("--only", choices=["big", "small"],
                    help="one case only (e.g. under valgrind: instructions of N rounds minus 1 round)")
    ap.add_argument("--end-to-end-only", action="store_true",
                    help="skip the parse and read stages (each round is then the service end to end only)")
    ap.add_argument("--compare", action="store_true",
                    help="also run each case through the spool only (the store-down path), interleaved")
    args = ap.parse_args(argv)

    raw = load(args.load) if args.load else capture(args.capture_seconds, args.capture_concurrency)
    if args.save:
        save(args.save, raw)
    log_name, big = streams(raw, None)
    _, small = streams(raw, args.small)
    total = sum(len(als_pb2.StreamAccessLogsMessage.FromString(m).http_logs.log_entry) for m in big)
    sizes = [len(als_pb2.StreamAccessLogsMessage.FromString(m).http_logs.log_entry) for m in big]
    print(f"captured: {len(raw)} message(s) from Envoy, {total} entries, {sum(map(len, raw)) / total:.0f} bytes "
          f"per entry; entries per message {sorted(sizes)}")
    cases = {f"N={max(sizes)} (Envoy's batches)": big, f"N={args.small}": small}
    if args.only:
        cases = dict([list(cases.items())[0 if args.only == "big" else 1]])
    if args.compare:
        cases = {**{f"{c}, direct": m for c, m in cases.items()}, **{f"{c}, spool": m for c, m in cases.items()}}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-alsbench-replay-"))
    if args.pg_dsn:
        store_url = args.pg_dsn
    else:
        store_url = f"sqlite:///{workdir / 'store.db'}"
    try:
        cpu = asyncio.run(_replay(workdir, store_url, log_name, cases, total, args.repeat,
                                  stages=not args.end_to_end_only))
        print(table(cpu, args.repeat, "PostgreSQL" if args.pg_dsn else "SQLite"))
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _replay(workdir: pathlib.Path, store_url: str, log_name: str, cases: dict[str, list[bytes]],
                  total: int, repeat: int, stages: bool = True) -> dict[str, dict[str, list[float]]]:
    """Each case's stream through the rig, ``repeat`` interleaved rounds: case -> stage -> CPU
    seconds per entry, one per round."""
    rigs = {False: Rig(workdir, store_url, log_name), True: Rig(workdir, store_url, log_name, spool_only=True)}
    for rig in rigs.values():
        rig.start()
    cpu: dict[str, dict[str, list[float]]] = {c: {} for c in cases}
    try:
        read = _reader(rigs[False])
        run = os.urandom(4).hex()  # a store shared between runs (PostgreSQL) sees new ids too
        for r in range(max(1, repeat)):
            order = list(cases) if r % 2 == 0 else list(cases)[::-1]
            for case in order:
                rig = rigs[case.endswith(", spool")]
                msgs = list(cases[case])
                msgs[0] = _renamed(msgs[0], f"bench-{run}-{r}-{case}")  # new event ids each round
                per = cpu[case]
                if stages:
                    t = time.process_time()
                    parsed = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in msgs]
                    per.setdefault("parse", []).append((time.process_time() - t) / total)
                    node = parsed[0].identifier.node.id
                    t = time.process_time()
                    for m in parsed:
                        read(m, node)
                    per.setdefault("read", []).append((time.process_time() - t) / total)
                audited = rig.audited()
                t = time.process_time()
                await rig.receive(msgs)
                per.setdefault("receive", []).append((time.process_time() - t) / total)
                t = time.process_time()
                rig.ship()
                per.setdefault("ship", []).append((time.process_time() - t) / total)
                if rig.audited() - audited != total or rig.spool.stats()["depth"]:
                    raise RuntimeError(f"{case}: {rig.audited() - audited} events audited, not {total}, "
                                       f"or some left in the spool")
                per.setdefault("end to end", []).append(per["receive"][-1] + per["ship"][-1])
        return cpu
    finally:
        for rig in rigs.values():
            await rig.close()


def table(cpu: dict[str, dict[str, list[float]]], rounds: int, store: str) -> str:
    """µs of CPU per entry per stage (median over rounds [min-max]) and against parsing alone."""
    out = [f"CPU per entry, this process (all threads), median over {rounds} round(s) [min-max]; store: {store}",
           "", "| case | stage | µs per entry | vs parse |", "|---|---|---:|---:|"]
    for case, stages in cpu.items():
        parse = statistics.median(stages["parse"]) if "parse" in stages else None
        for stage, vals in stages.items():
            med = statistics.median(vals)
            out.append(f"| {case} | {stage} | {med * 1e6:.1f} [{min(vals) * 1e6:.1f}-{max(vals) * 1e6:.1f}] "
                       f"| {f'{med / parse:.1f}x' if parse else '-'} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
