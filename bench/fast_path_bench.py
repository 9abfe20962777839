"""What does the Envoy-native fast path (issue 12) cost at the gateway, and at scale?

One run, on one machine, real Envoys rendered from the same gateway.yaml (jwt_authn in all) in
front of the same demo gRPC service, and one ext_authz server of ours (SQLite, warm) with
``fast_path.enabled``, which serves the compiled RBAC policy over ADS (ECDS) and audits
fast-path allows from Envoy's access log, exactly as shipped (``render_gateway(fast_path=True)``,
i.e. ``fastpath.envoy_config.with_fast_path``):

  baseline        Envoy + jwt_authn, no ext_authz                                 (1.00x)
  fast_allow      the fast-path gateway as rendered: an allow Envoy's RBAC decides itself,
                  audited through the access log (1 s / 1 MiB buffer)
  fast_allow_16k  the same with Envoy's default access-log buffer (16 KiB): a flush every
                  ~16 calls instead of once a second (what the batching buys)
  fast_allow_file the same allow audited through Envoy's FILE access log instead, tailed by
                  the same server (``audit_file``, ``fast_path.audit_file``; end to end)
  fast_no_audit   the same allow WITHOUT the access log: what the audit costs
  fast_allow_floor the same allow with Envoy writing each one's audit line (the file access
                  log's JSON line) to /dev/null and nothing reading it: NOT an audit, the least
                  any per-call record leaving Envoy costs (its formatting and write alone), so
                  the best any audited fast-path allow could do on this machine
  fast_denied     the fast-path gateway, a call RBAC does not allow: ext_authz decides (a denial)
  today_allow     today's gateway: ext_authz for every call, an allow
  today_denied    today's gateway, the same denial

Driven by h2load (gRPC over h2c, a prebuilt body) at each ``--concurrency``, in ``--repeat``
interleaved rounds (A B C.., ..C B A); cells are medians over rounds (gateway_bench.py).

Then the scale table with the fast path's own parts, at issue 13's size (10,000 engineers,
2,500 services, 6,000 RPCs; ``--quick``: 400, 100, 240; ``--scale SERVICES,RPCS,ENGINEERS``
for another): bench/scale_bench.py's synthetic gRPC services serving reflection with the
rpcauthz options (one endpoint per service, ``Read`` ENGINEERS_WITHOUT_APPROVAL, ``Write``
CONTRIBUTORS_WITHOUT_APPROVAL, the rest the service default CONTRIBUTORS_WITH_APPROVAL), its
grants (engineers; each team of 8 contributes to its services) in a SQLite store
(``GrantCache``, polled), the modes read through the real ``ReflectionCache`` (filled as
Checks would fill it), ``fastpath.publisher.Publisher`` compiling them and
``fastpath.xds.FastPathXds`` serving the policy to a gateway rendered with the fast path (its
access log left out, so the per-call row is the policy's cost alone): compiled policy size,
Envoy memory (admin /memory), push time (publish to Envoy's ACK), grant-change lag (store write
to Envoy's ACK of the version compiled from it), mode-change lag (a refreshed reflection answer
to Envoy's ACK), and the fast-path call against the same gateway with the small policy
(``fast_no_audit``), interleaved.

    python bench/fast_path_bench.py                          # 3 rounds of 10 s per cell
    python bench/fast_path_bench.py --duration 3 --repeat 3 --concurrency 1 16 --quick
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.gateway_bench import (  # noqa: E402
    ACCOUNTS,
    PATH,
    Cell,
    check_call,
    demo_backends,
    median_cells,
    process_cpu_seconds,
    run_h2load,
    stop_all,
)
from devstack.processes import EnvoyProcess, ExtAuthzProcess, free_port, render_gateway  # noqa: E402

ORDER = ["baseline", "fast_allow", "fast_allow_16k", "fast_allow_file", "fast_no_audit", "fast_allow_floor",
         "fast_denied", "today_allow", "today_denied"]
ENGINEER, OUTSIDER = "bench-engineer", "bench-outsider"
FAST_ALLOWED = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"


def start_envoy(name: str, cfg: dict[str, Any], workdir: pathlib.Path, concurrency: int) -> EnvoyProcess:
    """An Envoy of ``cfg`` (not yet ready) in ``workdir / name``, with ``concurrency`` workers."""
    return EnvoyProcess(cfg, workdir / name, name=f"envoy-{name}", concurrency=concurrency)


def _memory(e: EnvoyProcess) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{e.admin_port}/memory", timeout=5) as r:
        data = json.load(r)
    return {k: int(v) for k, v in data.items() if str(v).isdigit()}


def without_audit(cfg: dict[str, Any]) -> dict[str, Any]:
    """A rendered fast-path gateway without its access log of fast-path allows."""
    out = json.loads(json.dumps(cfg))
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f.get("typed_config", {})
                if "access_log" in hcm:
                    hcm["access_log"] = [a for a in hcm["access_log"] if a["name"] != "envoy.access_loggers.http_grpc"]
    return out


def with_audit_buffer(cfg: dict[str, Any], size_bytes: int) -> dict[str, Any]:
    """A rendered fast-path gateway whose access log of fast-path allows buffers ``size_bytes``."""
    out = json.loads(json.dumps(cfg))
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for a in f.get("typed_config", {}).get("access_log", []):
                    if a["name"] == "envoy.access_loggers.http_grpc":
                        a["typed_config"]["common_config"]["buffer_size_bytes"] = size_bytes
    return out


def until_fast(e: EnvoyProcess, token: str, timeout: float = 30.0) -> None:
    """Call until Envoy's RBAC allows the call itself (the server learnt the mode and pushed)."""
    from devstack.democlient import call

    deadline = time.monotonic() + timeout
    while True:
        before = int(e.stats(FAST_ALLOWED).get(FAST_ALLOWED) or 0)
        r = call(f"127.0.0.1:{e.port}", PATH, token=token)
        if r.code.name != "OK":
            raise RuntimeError(f"sanity call through :{e.port} failed: {r.render()}")
        if int(e.stats(FAST_ALLOWED).get(FAST_ALLOWED) or 0) > before:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fast path never allowed {PATH} through :{e.port}")
        time.sleep(0.1)


def fast_path_server(workdir: pathlib.Path, accounts_address: str,
                     audit_file: pathlib.Path | None = None, shards: int = 1) -> ExtAuthzProcess:
    """Our ext_authz server (not yet ready) as the benches run it: SQLite store in ``workdir``
    with ENGINEER granted, the audit spool, the fast path on (modes checked every 0.2 s, the
    policy in ``shards`` parts; > 1: its files in a subdirectory of its own), the demo
    Accounts service's reflection at ``accounts_address``; with ``audit_file``, also tailing
    that file access log of fast-path allows (ALS entries are still taken)."""
    from policy import Grant, Role
    from policy.stores import open_store

    if shards > 1:
        workdir = workdir / f"shards-{shards}"
        workdir.mkdir(exist_ok=True)

    store_url = f"sqlite:///{workdir / 'bench.db'}"
    store = open_store(store_url)
    store.put_grant(Grant(ENGINEER, Role.ENGINEER))
    store.close()
    return ExtAuthzProcess({
        "store_url": store_url, "listen": {"host": "127.0.0.1", "port": free_port()}, "drain_notice_s": 0,
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "audit": {"spool_path": str(workdir / "audit-spool.db")},
        "fast_path": {"enabled": True, "modes_check_s": 0.2, "shards": shards,
                      "audit_file": None if audit_file is None else str(audit_file)},
        "reflection": {"endpoints": {"static": {ACCOUNTS: accounts_address}}},
    }, workdir, env={"PYTHONWARNINGS": "ignore"})


def running_fast_path_server(workdir: pathlib.Path, accounts_address: str, things: list[Any],
                             audit_file: pathlib.Path | None = None, shards: int = 1) -> ExtAuthzProcess:
    """``fast_path_server``, started, ready, and added to ``things`` (stopped with them)."""
    ours = fast_path_server(workdir, accounts_address, audit_file, shards)
    things.append(ours)
    ours.wait_ready()
    return ours


def demo_gateway(jwks_port: int, upstream_port: int, extauthz_port: int | None,
                 fast_path: bool = False, audit_file: pathlib.Path | None = None, shards: int = 1) -> dict[str, Any]:
    """The demo gateway as the benches render it (free ports, the demo upstream behind both
    demo clusters, its stdout log to /dev/null); ``extauthz_port`` None: no ext_authz; with
    ``audit_file`` the fast path's audit goes to that file instead of ALS; the policy in
    ``shards`` parts (the server's ``fast_path.shards``)."""
    return render_gateway(listen_port=free_port(), admin_port=free_port(), extauthz_port=extauthz_port,
                          jwks_port=jwks_port, upstreams={"demo_accounts": upstream_port,
                                                          "demo_ledger": upstream_port},
                          access_log="/dev/null", fast_path=fast_path, fast_path_audit_file=audit_file,
                          fast_path_shards=shards)


def interleaved_rounds(order: list[str], scenarios: dict[str, tuple[EnvoyProcess, str]], ours: ExtAuthzProcess,
                       body: pathlib.Path, workdir: pathlib.Path, args: argparse.Namespace
                       ) -> tuple[list[list[Cell]], dict[tuple[str, int], list[tuple[float, float, float]]]]:
    """h2load through each scenario's (Envoy, caller token) at each ``args.concurrency``, in
    ``args.repeat`` rounds alternating ``order`` and its reverse. Returns the rounds' cells and,
    per (scenario, concurrency), each round's CPU µs per call of (the Envoy, our server, the
    upstream with this bench)."""
    rounds: list[list[Cell]] = []
    cpu: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for i in range(max(1, args.repeat)):
        cells = []
        for c in args.concurrency:
            for name in order if i % 2 == 0 else order[::-1]:
                envoy, token = scenarios[name]
                pids = (envoy.pid, ours.pid)
                before = [process_cpu_seconds(pid) for pid in pids] + [time.process_time()]
                cell = run_h2load(envoy.port, token, body, c, args.duration, args.warmup, workdir, name)
                after = [process_cpu_seconds(pid) for pid in pids] + [time.process_time()]
                # Warm-up calls burn CPU too: divide by every call h2load made.
                calls = max(1, cell.requests * (args.duration + args.warmup) / args.duration)
                cpu.setdefault((name, c), []).append(
                    tuple((a - b) * 1e6 / calls for a, b in zip(after, before, strict=True)))  # type: ignore[arg-type]
                cells.append(cell)
        rounds.append(cells)
    return rounds, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; cells report the median")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--scale", default="2500,6000,10000",
                    help="SERVICES,RPCS,ENGINEERS of the scale table; 'none' skips it")
    ap.add_argument("--quick", action="store_true",
                    help="the scale table at a small organisation (100 services, 240 RPCs, 400 engineers)")
    args = ap.parse_args(argv)
    if args.quick and args.scale != "none":
        args.scale = "100,240,400"
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    scale = None if args.scale == "none" else tuple(int(x) for x in args.scale.split(","))
    if scale is not None and (len(scale) != 3 or scale[1] < 2 * scale[0] or scale[2] < 8):
        print(f"--scale takes SERVICES,RPCS,ENGINEERS (RPCS >= 2 x SERVICES, ENGINEERS >= 8), not {args.scale!r}",
              file=sys.stderr)
        return 2


    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-fastbench-"))
    things: list[Any] = []
    try:
        issuer, jwks, upstream, body = demo_backends(workdir, things)
        tokens = {who: issuer.mint(who, ttl_seconds=3600) for who in (ENGINEER, OUTSIDER)}
        audit_file = workdir / "fast-path-audit.log"
        ours = running_fast_path_server(workdir, upstream.address, things, audit_file)
        ours_port = ours.port

        def gateway(ext: int | None, fast_path: bool = False, audit_to: pathlib.Path | None = None) -> dict[str, Any]:
            return demo_gateway(jwks.port, upstream.port, ext, fast_path, audit_to)
        envoys = {"baseline": start_envoy("baseline", gateway(None), workdir, args.envoy_concurrency),
                  "fast": start_envoy("fast", gateway(ours_port, True), workdir, args.envoy_concurrency),
                  "fast_16k": start_envoy("fast_16k", with_audit_buffer(gateway(ours_port, True), 16384),
                                     workdir, args.envoy_concurrency),
                  "fast_file": start_envoy("fast_file", gateway(ours_port, True, audit_file), workdir,
                                           args.envoy_concurrency),
                  "fast_no_audit": start_envoy("fast_no_audit", without_audit(gateway(ours_port, True)),
                                          workdir, args.envoy_concurrency),
                  "fast_floor": start_envoy("fast_floor", gateway(ours_port, True, pathlib.Path("/dev/null")),
                                            workdir, args.envoy_concurrency),
                  "today": start_envoy("today", gateway(ours_port), workdir, args.envoy_concurrency)}
        things.extend(envoys.values())
        for e in envoys.values():
            e.wait_ready()
        for e in envoys.values():
            check_call(e.port, tokens[ENGINEER])  # also warms reflection and connections
        for name in ("fast", "fast_16k", "fast_file", "fast_no_audit", "fast_floor"):
            until_fast(envoys[name], tokens[ENGINEER])
        for name in ("fast", "today"):
            check_call(envoys[name].port, tokens[OUTSIDER], PATH, "PERMISSION_DENIED")
        #: scenario -> (envoy, caller)
        scenarios = {"baseline": ("baseline", ENGINEER), "fast_allow": ("fast", ENGINEER),
                     "fast_allow_16k": ("fast_16k", ENGINEER), "fast_allow_file": ("fast_file", ENGINEER),
                     "fast_no_audit": ("fast_no_audit", ENGINEER), "fast_allow_floor": ("fast_floor", ENGINEER),
                     "fast_denied": ("fast", OUTSIDER), "today_allow": ("today", ENGINEER),
                     "today_denied": ("today", OUTSIDER)}
        rounds, cpu = interleaved_rounds(
            ORDER, {name: (envoys[envoy], tokens[who]) for name, (envoy, who) in scenarios.items()},
            ours, body, workdir, args)
        print(f"{len(rounds)} round(s) of {args.duration:g} s per cell, Envoy --concurrency {args.envoy_concurrency}, "
              "the fast path as rendered (RBAC over ADS from our server), every fast-path allow audited "
              "through the access log")
        print(render(median_cells(rounds, ORDER)))
        print()
        print(spread(rounds))
        print()
        print(cpu_table(cpu))
        print()
        print(audit_line([envoys["fast"], envoys["fast_16k"], envoys["fast_file"]], ours))
        if scale is not None:
            print()
            print(scale_table(scale, envoys["fast_no_audit"], gateway, tokens[ENGINEER], body, workdir, args,
                              accounts_reflection=upstream.address))
        return 0
    finally:
        stop_all(things, workdir)


def render(cells: list[Cell]) -> str:
    """The ratio table: every scenario against the baseline, denials also against today's."""
    by = {(c.scenario, c.concurrency): c for c in cells}

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}x" if b else "-"
    out = ["| scenario | concurrency | requests | throughput (req/s) | p50 (ms) | p99 (ms) | throughput vs baseline "
           "| p50 vs baseline | p99 vs baseline | throughput vs today | p50 vs today |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        base = by[("baseline", c.concurrency)]
        today_name = "today_denied" if c.scenario.endswith("denied") else "today_allow"
        today = by.get((today_name, c.concurrency)) if c.scenario.startswith("fast") else None
        out.append(f"| {c.scenario} | {c.concurrency} | {c.ok} | {c.rps:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
                   f"| {ratio(c.rps, base.rps)} | {ratio(c.p50_ms, base.p50_ms)} | {ratio(c.p99_ms, base.p99_ms)} "
                   f"| {ratio(c.rps, today.rps if today else None)} | {ratio(c.p50_ms, today.p50_ms if today else None)} |")
    out.append("")
    for conc in sorted({c.concurrency for c in cells}):
        base, fast = by[("baseline", conc)], by[("fast_allow", conc)]
        met = fast.rps >= 0.9 * base.rps and fast.p50_ms <= 1.15 * base.p50_ms
        den, today_den = by[("fast_denied", conc)], by[("today_denied", conc)]
        out.append(f"concurrency {conc}: fast-path allows {fast.rps / base.rps:.2f}x throughput, "
                   f"{fast.p50_ms / base.p50_ms:.2f}x p50 of the baseline (goal >= 0.9x, <= 1.15x: "
                   f"{'met' if met else 'NOT met'}); calls that still need ext_authz "
                   f"{den.rps / today_den.rps:.2f}x throughput, {den.p50_ms / today_den.p50_ms:.2f}x p50 of today's")
        floor, bare = by.get(("fast_allow_floor", conc)), by.get(("fast_no_audit", conc))
        if floor is not None and bare is not None:
            out.append(f"concurrency {conc}: the floor of any per-call audit (Envoy's line to /dev/null, nothing "
                       f"reading it) {floor.rps / base.rps:.2f}x throughput, {floor.p50_ms / base.p50_ms:.2f}x p50; "
                       f"the fast path without audit {bare.rps / base.rps:.2f}x, {bare.p50_ms / base.p50_ms:.2f}x")
    return "\n".join(out)


def spread(rounds: list[list[Cell]]) -> str:
    """The goal's ratios round by round (each against the same round's cell): the median and
    the range, so a difference can be told from the machine's noise."""
    pairs = [("fast_allow", "baseline"), ("fast_allow_file", "baseline"), ("fast_no_audit", "baseline"),
             ("fast_allow_floor", "baseline"), ("fast_allow", "fast_no_audit"), ("fast_allow_file", "fast_no_audit"),
             ("fast_allow_floor", "fast_no_audit"),
             ("fast_denied", "today_denied")]
    out = ["| ratio (per round) | concurrency | throughput: median [min-max] | p50: median [min-max] |",
           "|---|---:|---:|---:|"]
    for conc in sorted({c.concurrency for r in rounds for c in r}):
        for a, b in pairs:
            tps, p50s = [], []
            for r in rounds:
                by = {c.scenario: c for c in r if c.concurrency == conc}
                if a in by and b in by and by[b].rps and by[b].p50_ms:
                    tps.append(by[a].rps / by[b].rps)
                    p50s.append(by[a].p50_ms / by[b].p50_ms)
            if tps:
                out.append(f"| {a} / {b} | {conc} | {statistics.median(tps):.2f}x [{min(tps):.2f}-{max(tps):.2f}] "
                           f"| {statistics.median(p50s):.2f}x [{min(p50s):.2f}-{max(p50s):.2f}] |")
    return "\n".join(out)


def cpu_table(cpu: dict[tuple[str, int], list[tuple[float, float, float]]]) -> str:
    """CPU per call (medians over rounds; warm-up included, so approximate): where the time goes.

    The last column is the baseline's CPU per call (all three together) over the scenario's:
    the throughput ratio the machine's CPU allows when its cores are saturated (c=16 on 2
    cores), so a goal of 0.9x there is a budget of the baseline's CPU / 0.9 per call."""
    out = ["| scenario | concurrency | Envoy CPU/call (µs) | ext_authz server CPU/call (µs) "
           "| upstream + bench CPU/call (µs) | all (µs) | baseline's all / this |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    meds = {key: [statistics.median(v[i] for v in vals) for i in range(3)] for key, vals in cpu.items()}
    for (name, c), med in meds.items():
        base = meds.get(("baseline", c))
        budget = f"{sum(base) / sum(med):.2f}x" if base and sum(med) > 0 else "-"
        out.append(f"| {name} | {c} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | {sum(med):.0f} | {budget} |")
    return "\n".join(out)


def audit_line(envoys: list[EnvoyProcess], ours: ExtAuthzProcess) -> str:
    """The fast-path allows ``envoys`` counted against the entries our server audited."""
    stat = FAST_ALLOWED
    deadline = time.monotonic() + 10  # Envoy flushes its access log once a second
    while True:
        allowed = sum(int(e.stats(stat).get(stat) or 0) for e in envoys)
        with urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(ours)}/metrics", timeout=5) as r:
            text = r.read().decode()
        audited = int(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                          if ln.startswith('rpcauthz_fast_path_entries_total{result="audited"}')))
        if audited == allowed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return (f"fast-path allows: Envoy counted {allowed}, the server audited {audited} "
            f"({'equal' if allowed == audited else 'DIFFERENT'})")


def _metrics_port(ours: ExtAuthzProcess) -> int:
    import yaml

    return int(yaml.safe_load(ours.config_path.read_text())["metrics"]["port"])


def fast_path_modes(s: int, method: str) -> int | None:
    """The scale table's synthetic services (bench/scale_bench.py): ``Read`` for every engineer,
    ``Write`` for the service's contributors, the rest the service default (with approval)."""
    from rpcauthz.v1 import options_pb2

    return {"Read": options_pb2.ENGINEERS_WITHOUT_APPROVAL,
            "Write": options_pb2.CONTRIBUTORS_WITHOUT_APPROVAL}.get(method)


class ControlPlane:
    """The fast path's server side at scale, on its own event loop thread: a SQLite store and
    ``GrantCache``, a ``ReflectionCache`` over ``endpoints``, the ``Publisher`` and
    ``FastPathXds`` (ADS) on a gRPC port. ``fill()`` the cache before ``start_publishing()``."""

    def __init__(self, store_url: str, endpoints: dict[str, str]) -> None:
        from policy.grant_cache import GrantCache
        from policy.stores import open_store

        self.port = free_port()
        self.endpoints = endpoints
        self.store = open_store(store_url, poll_interval=0.05)
        self.grants = GrantCache(self.store)
        self.grants.start()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._run(self._start())

    async def _start(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import ads_pb2_grpc

        from fastpath.publisher import Publisher
        from fastpath.xds import FastPathXds
        from policy import Mode
        from reflection_cache.cache import CacheSettings, ReflectionCache
        from reflection_cache.endpoints import EndpointResolver

        # A long TTL: the table measures one mode change by refreshing one entry by hand.
        self.modes = ReflectionCache(EndpointResolver(static=self.endpoints),
                                     CacheSettings(ttl=3600, stale_window=3600, deadline=10))
        self.xds = FastPathXds(ttl_s=60)
        self.publisher = Publisher(self.xds, self.grants, self.modes, default_mode=Mode.BREAK_GLASS_ONLY,
                                   horizon=timedelta(seconds=70))
        self.server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.xds, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    def _run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def fill(self, batch: int = 64) -> float:
        """Ask the reflection cache for every service (``batch`` at a time), as Checks would;
        seconds taken."""
        async def fill() -> None:
            names = list(self.endpoints)
            for i in range(0, len(names), batch):
                await asyncio.gather(*(self.modes.get(n) for n in names[i:i + batch]))
        t = time.monotonic()
        self._run(fill(), timeout=1800)
        return time.monotonic() - t

    def refetch(self, service: str) -> None:
        """Fetch ``service``'s modes afresh (what a refresh at the reflection TTL does; between
        the two steps the service is briefly unknown: a modes check may see that)."""
        async def refetch() -> None:
            self.modes.invalidate(service)
            await self.modes.get(service)
        self._run(refetch())

    def known_ms(self, n: int = 5) -> float:
        """Milliseconds of the publisher's modes check (``known()`` and the comparison with the
        last one), median of ``n``."""
        async def once() -> float:
            seen = self.modes.known()
            t = time.perf_counter()
            now = self.modes.known()
            _changed = now != seen
            return (time.perf_counter() - t) * 1e3
        return statistics.median(self._run(once()) for _ in range(n))

    def start_publishing(self) -> None:
        async def start() -> None:
            self.task = asyncio.get_running_loop().create_task(self.publisher.run())
        self._run(start())

    def acked(self, timeout: float = 120.0, after: str | None = None,
              services: int | None = None) -> tuple[str, float]:
        """Wait until the publisher's current version (newer than ``after``; compiled from
        ``services`` services' modes, if given) is ACKed by the Envoy; (version, monotonic time
        of the ACK seen)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            push = self.publisher.last_push
            status = self.xds.status()
            if any(s.nacks for s in status):
                raise RuntimeError(f"Envoy refused the policy: {status[0].last_nack}")
            if push is not None and push.version != after and any(
                    s.acked_version == push.version and (services is None or (
                        s.acked_source is not None and s.acked_source.services == services))
                    for s in status):
                return push.version, time.monotonic()
            time.sleep(0.001)
        raise TimeoutError("Envoy never ACKed the compiled policy")

    def acked_revision(self, revision: int, timeout: float = 120.0) -> float:
        """Wait until the Envoy ACKed a policy compiled from grants revision >= ``revision``;
        the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acked = self.xds.acked_grants_revision()
            if acked is not None and acked >= revision:
                return time.monotonic()
            time.sleep(0.001)
        raise TimeoutError(f"Envoy never ACKed a policy of grants revision {revision}")

    def close(self) -> None:
        async def stop() -> None:
            if hasattr(self, "task"):
                self.task.cancel()
            await self.server.stop(0)
            await self.modes.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.grants.close()
        self.store.close()


def scale_table(scale: tuple[int, int, int], small_envoy: EnvoyProcess, gateway: Any, token: str,
                body: pathlib.Path, workdir: pathlib.Path, args: argparse.Namespace, *,
                accounts_reflection: str) -> str:
    """The fast path's own parts at ``scale`` (see the module docstring)."""
    from scale_bench import Org, endpoints, reflection_pool, serve_reflection, service_name, synthetic_grants

    from policy import Grant, Role
    from policy.stores import open_store

    services, rpcs, engineers = scale
    org = Org(engineers=engineers, services=services, rpcs=rpcs, requests=0)
    t0 = time.perf_counter()
    reflection, port, servicer = serve_reflection(org, fast_path_modes)
    grants = list(synthetic_grants(org))
    store_url = f"sqlite:///{workdir / 'scale.db'}"
    store = open_store(store_url)
    try:
        store.replace_grants("sync:bench", [dataclasses.replace(g, source="sync:bench")
                                            for g in [*grants, Grant(ENGINEER, Role.ENGINEER)]])
    finally:
        store.close()
    gen_s = time.perf_counter() - t0
    # The benchmark's caller and method: the demo's ENGINEERS_WITHOUT_APPROVAL method, its
    # modes from the demo server's own reflection.
    control = ControlPlane(store_url, {**endpoints(org, port), ACCOUNTS: accounts_reflection})
    big: EnvoyProcess | None = None
    try:
        fill_s = control.fill()
        known = len(control.modes.known())
        known_ms = control.known_ms()
        control.start_publishing()
        big = EnvoyProcess(without_audit(gateway(control.port, True)), workdir / "scale", name="envoy-scale",
                           concurrency=args.envoy_concurrency)
        big.wait_ready(timeout=300)
        control.acked()
        compiled = control.publisher.current
        assert compiled is not None and control.publisher.last_push is not None
        compile_s = control.publisher.last_push.compile_s
        mem_big = _memory(big)
        check_call(big.port, token)
        # Grant changes end to end: a store write -> GrantCache (poll 0.05 s) -> debounce 0.1 s ->
        # compile -> ADS push -> Envoy's ACK of a version compiled from that revision.
        lags: list[float] = []
        pushes: list[float] = []
        compiles: list[float] = [compile_s]
        for i in range(3):
            s2 = open_store(store_url)
            try:
                t_write = time.monotonic()
                s2.put_grant(Grant(f"new-hire-{i}@corp.example", Role.ENGINEER))
                revision = s2.grants_revision()
            finally:
                s2.close()
            acked_at = control.acked_revision(revision)
            lags.append(acked_at - t_write)
            assert control.xds.published_at is not None
            pushes.append(acked_at - control.xds.published_at)
            compiles.append(control.publisher.last_push.compile_s if control.publisher.last_push else 0.0)
        # A mode change end to end, from the reflection answer the cache takes at its TTL (here
        # fetched at once) to Envoy's ACK: service 0's Read turns ENGINEERS_WITH_APPROVAL, and back.
        def changed(s: int, method: str) -> int | None:
            from rpcauthz.v1 import options_pb2
            return options_pb2.ENGINEERS_WITH_APPROVAL if (s, method) == (0, "Read") else fast_path_modes(s, method)
        pools = [reflection_pool(org, changed), servicer.pool]
        mode_lags: list[float] = []
        for pool in pools * 2:
            before = control.publisher.last_push.version if control.publisher.last_push else "0"
            servicer.pool = pool
            control.refetch(service_name(0))
            t_seen = time.monotonic()
            v, acked_at = control.acked(after=before, services=known)
            if int(v) == int(before) + 1:  # else a modes check fell between invalidate and fetch
                mode_lags.append(acked_at - t_seen)
                compiles.append(control.publisher.last_push.compile_s if control.publisher.last_push else 0.0)
        p: dict[tuple[str, int], list[Cell]] = {}
        for r in range(max(1, args.repeat)):
            pair = [("small", small_envoy), ("scale", big)]
            for c in args.concurrency:
                for name, e in (pair if r % 2 == 0 else pair[::-1]):
                    p.setdefault((name, c), []).append(
                        run_h2load(e.port, token, body, c, args.duration, args.warmup, workdir, f"scale-{name}"))
        mem_small = _memory(small_envoy)
        small_bytes = _small_policy_bytes()
    finally:
        if big is not None:
            big.stop()
        control.close()
        reflection.stop(0)

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    def med(name: str, c: int, what: str) -> float:
        return statistics.median(getattr(x, what) for x in p[(name, c)])
    rows = [
        ("grants (engineer + contributor), services with modes (through the reflection cache)",
         f"{len(grants) + 1:,}, {known:,}", "1, 1"),
        (f"reflection cache filled: {len(control.endpoints):,} services, one endpoint each (64 at a time)",
         f"{fill_s:.1f} s", "-"),
        ("publisher's modes check (known() + compare, every modes_check_s)", f"{known_ms:.2f} ms", "-"),
        ("compiled RBAC policy (fastpath.compile, serialized)",
         f"{compiled.size_bytes / 1024:.0f} KiB ({compiled.engineers:,} engineers x {compiled.engineer_paths:,} "
         f"paths, {compiled.contributor_services:,} contributor services)", f"{small_bytes} B"),
        (f"compile time (publisher, in a thread; median of {len(compiles)})", f"{statistics.median(compiles) * 1000:.0f} ms", "-"),
        ("Envoy memory allocated (admin /memory)", mib(mem_big.get("allocated", 0)), mib(mem_small.get("allocated", 0))),
        ("Envoy heap size", mib(mem_big.get("heap_size", 0)), mib(mem_small.get("heap_size", 0))),
        ("xDS push of a new version: publish -> Envoy ACK (median of 3)", f"{statistics.median(pushes) * 1000:.0f} ms", "-"),
        ("grant change: store write -> Envoy ACK of a version compiled from it (median of 3; SQLite poll "
         "0.05 s, debounce 0.1 s, compile, push)",
         f"{statistics.median(lags) * 1000:.0f} ms ({min(lags) * 1000:.0f}-{max(lags) * 1000:.0f})", "-"),
        (f"mode change: reflection answer taken by the cache -> Envoy ACK (median of {len(mode_lags)}; modes_check_s 1 s, "
         "debounce 0.1 s, compile, push; add the reflection TTL for a redeploy)",
         f"{statistics.median(mode_lags) * 1000:.0f} ms ({min(mode_lags) * 1000:.0f}-{max(mode_lags) * 1000:.0f})"
         if mode_lags else "not measured", "-"),
    ]
    for c in args.concurrency:
        rows.append((f"fast-path call at c={c}: throughput, p50 (no access log; ratio vs small policy)",
                     f"{med('scale', c, 'rps'):.0f} req/s, {med('scale', c, 'p50_ms'):.2f} ms "
                     f"({med('scale', c, 'rps') / med('small', c, 'rps'):.2f}x, "
                     f"{med('scale', c, 'p50_ms') / med('small', c, 'p50_ms'):.2f}x)",
                     f"{med('small', c, 'rps'):.0f} req/s, {med('small', c, 'p50_ms'):.2f} ms"))
    out = [f"scale: {services:,} services, {rpcs:,} RPCs, {engineers:,} engineers (reflection server and store "
           f"built in {gen_s:.1f} s); bench/scale_bench.py's services serving reflection, the reflection cache, "
           "fastpath's compiler, publisher and ADS server, the gateway as rendered",
           "| measure | at scale | small policy (one engineer, one method) |", "|---|---:|---:|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)
def _small_policy_bytes() -> int:
    from fastpath.compile import compile_policy
    from policy import Grant, GrantSet, Mode, Role
    from reflection_cache.types import ServiceModes

    modes = {ACCOUNTS: ServiceModes(ACCOUNTS, {PATH.rsplit("/", 1)[1]: Mode.ENGINEERS_WITHOUT_APPROVAL})}
    return compile_policy(modes, GrantSet([Grant(ENGINEER, Role.ENGINEER)], revision=1), datetime.now(UTC),
                          version="1", default_mode=Mode.BREAK_GLASS_ONLY, horizon=timedelta(seconds=40)).size_bytes


if __name__ == "__main__":
    sys.exit(main())
