"""What does the Envoy-native fast path (issue 12) cost at the gateway, and at scale?

One run, on one machine, three real Envoys built from the same gateway.yaml (jwt_authn in all)
in front of the same demo gRPC service, and one ext_authz server of ours (SQLite, warm):

  baseline       Envoy + jwt_authn, no ext_authz                                  (1.00x)
  fast_allow     the fast-path Envoy (shadow RBAC -> ext_authz only when RBAC did not allow,
                 access log of fast-path allows to our server, which audits each): an allow
                 Envoy decides itself
  fast_no_audit  the same allow on a fast-path Envoy WITHOUT the access log: what the audit
                 (Envoy's ALS client and our server taking the entries) costs
  fast_denied    the fast-path Envoy, a call RBAC does not allow: ext_authz decides (a denial)
  today_allow    today's gateway: ext_authz for every call, an allow
  today_denied   today's gateway, the same denial

The RBAC policy is STATIC here (tests/support/fast_path_envoy.py, the contract's filter names,
keys and log name); over xDS it is the same filter with the same policy. Driven by h2load
(gRPC over h2c, a prebuilt body) at each ``--concurrency``, in ``--repeat`` interleaved rounds
(A B C.., ..C B A), cells are medians over rounds (gateway_bench.py's machinery).

Then the scale table (``--scale SERVICES,RPCS,ENGINEERS``, default 2500,6000,10000): RBAC
policies of that size from a generator, their size as a proto, Envoy's memory with them
(admin /memory) against the small policy, the time Envoy takes to load them, and the fast-path
p50 at c=1 for a caller and method at the END of the policy (the worst case for RBAC's linear
match) against the small policy. xDS push time and grant-change-to-Envoy lag need the ADS
server (fastpath/xds.py); without it they are printed as "n/a".

    python bench/fast_path_bench.py                          # 3 rounds of 10 s per cell
    python bench/fast_path_bench.py --duration 3 --repeat 3 --concurrency 1 16
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gateway_bench import ACCOUNTS, PATH, Cell, check_call, median_cells, run_h2load  # noqa: E402
from devstack.processes import EnvoyProcess, ExtAuthzProcess, free_port, render_gateway  # noqa: E402
from tests.support.fast_path_envoy import Policy, rbac_filter, scale_policies, with_static_fast_path  # noqa: E402
from tests.support.grpc_frames import frame  # noqa: E402

ORDER = ["baseline", "fast_allow", "fast_no_audit", "fast_denied", "today_allow", "today_denied"]
ENGINEER, OUTSIDER = "bench-engineer", "bench-outsider"


def _envoy(name: str, cfg: dict[str, Any], workdir: pathlib.Path, concurrency: int) -> EnvoyProcess:
    return EnvoyProcess(cfg, workdir / name, name=f"envoy-{name}", concurrency=concurrency)


def _memory(e: EnvoyProcess) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{e.admin_port}/memory", timeout=5) as r:
        data = json.load(r)
    return {k: int(v) for k, v in data.items() if str(v).isdigit()}


def policy_bytes(policies: list[Policy]) -> int:
    """The size of the RBAC filter config holding ``policies``, as a serialized proto."""
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from google.protobuf import json_format

    cfg = dict(rbac_filter(policies)["typed_config"])
    cfg.pop("@type")
    return json_format.ParseDict(cfg, rbac_pb2.RBAC()).ByteSize()


def _expect(port: int, token: str, path: str, code: str) -> None:
    from devstack.democlient import call

    result = call(f"127.0.0.1:{port}", path, token=token)
    if result.code.name != code:
        raise RuntimeError(f"sanity call {path} through :{port} gave {result.render()}, expected {code}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; cells report the median")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--scale", default="2500,6000,10000",
                    help="SERVICES,RPCS,ENGINEERS of the scale table; 'none' skips it")
    args = ap.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    scale = None if args.scale == "none" else tuple(int(x) for x in args.scale.split(","))
    if scale is not None and len(scale) != 3:
        print(f"--scale takes SERVICES,RPCS,ENGINEERS, not {args.scale!r}", file=sys.stderr)
        return 2

    from devstack.demo_services import start_demo_server
    from devstack.devissuer import DevIssuer
    from policy import Grant, Role
    from policy.stores import open_store
    from rpcauthz.demo.v1 import accounts_pb2

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-fastbench-"))
    things: list[Any] = []
    try:
        issuer = DevIssuer()
        jwks = issuer.serve()
        things.append(jwks)
        upstream = start_demo_server(services=("accounts", "ledger"), max_workers=32)
        things.append(upstream)
        tokens = {who: issuer.mint(who, ttl_seconds=3600) for who in (ENGINEER, OUTSIDER)}
        body = workdir / "request.bin"
        body.write_bytes(frame(accounts_pb2.AccountRequest(account_id="A-1").SerializeToString()))
        store_url = f"sqlite:///{workdir / 'bench.db'}"
        store = open_store(store_url)
        store.put_grant(Grant(ENGINEER, Role.ENGINEER))
        store.close()
        ours_port = free_port()
        ours = ExtAuthzProcess({
            "store_url": store_url, "listen": {"host": "127.0.0.1", "port": ours_port}, "drain_notice_s": 0,
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "audit": {"spool_path": str(workdir / "audit-spool.db")},
            "fast_path": {"enabled": True},
            "reflection": {"endpoints": {"static": {ACCOUNTS: upstream.address}}},
        }, workdir, env={"PYTHONWARNINGS": "ignore"})
        things.append(ours)
        ours.wait_ready()

        def gateway(ext: int | None) -> dict[str, Any]:
            return render_gateway(listen_port=free_port(), admin_port=free_port(), extauthz_port=ext,
                                  jwks_port=jwks.port, upstreams={"demo_accounts": upstream.port,
                                                                  "demo_ledger": upstream.port},
                                  access_log="/dev/null")
        small = [Policy("v1/engineers", [ENGINEER], [PATH])]
        envoys = {"baseline": _envoy("baseline", gateway(None), workdir, args.envoy_concurrency),
                  "fast": _envoy("fast", with_static_fast_path(gateway(ours_port), small, flush_interval_s=1.0),
                                 workdir, args.envoy_concurrency),
                  "fast_no_audit": _envoy("fast_no_audit", with_static_fast_path(gateway(ours_port), small, als=False),
                                          workdir, args.envoy_concurrency),
                  "today": _envoy("today", gateway(ours_port), workdir, args.envoy_concurrency)}
        things.extend(envoys.values())
        for e in envoys.values():
            e.wait_ready()
        for e in envoys.values():
            check_call(e.port, tokens[ENGINEER])  # also warms reflection and connections
        for name in ("fast", "today"):
            _expect(envoys[name].port, tokens[OUTSIDER], PATH, "PERMISSION_DENIED")
        #: scenario -> (envoy, caller)
        scenarios = {"baseline": ("baseline", ENGINEER), "fast_allow": ("fast", ENGINEER),
                     "fast_no_audit": ("fast_no_audit", ENGINEER),
                     "fast_denied": ("fast", OUTSIDER), "today_allow": ("today", ENGINEER),
                     "today_denied": ("today", OUTSIDER)}
        rounds: list[list[Cell]] = []
        for i in range(max(1, args.repeat)):
            order = ORDER if i % 2 == 0 else ORDER[::-1]
            cells = []
            for c in args.concurrency:
                for name in order:
                    envoy, who = scenarios[name]
                    cells.append(run_h2load(envoys[envoy].port, tokens[who], body, c, args.duration,
                                            args.warmup, workdir, name))
            rounds.append(cells)
        print(f"{len(rounds)} round(s) of {args.duration:g} s per cell, Envoy --concurrency {args.envoy_concurrency}, "
              "static shadow RBAC, every fast-path allow audited through the access log")
        print(render(median_cells(rounds, ORDER)))
        print()
        print(audit_line(envoys["fast"], ours))
        if scale is not None:
            print()
            print(scale_table(scale, envoys["fast"], gateway, ours_port, tokens[ENGINEER], body, workdir, args))
        return 0
    finally:
        for t in reversed(things):
            try:
                if hasattr(t, "address"):
                    t.stop(grace=0)
                elif hasattr(t, "stop"):
                    t.stop()
                else:
                    t.close()
            except Exception as ex:
                print(f"cleanup: {ex}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


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
    return "\n".join(out)


def audit_line(envoy: EnvoyProcess, ours: ExtAuthzProcess) -> str:
    """Envoy's count of fast-path allows against the entries our server audited."""
    stat = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
    deadline = time.monotonic() + 10  # Envoy flushes its access log once a second
    while True:
        allowed = int(envoy.stats(stat).get(stat) or 0)
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


def scale_table(scale: tuple[int, int, int], small_envoy: EnvoyProcess, gateway: Any, ours_port: int,
                token: str, body: pathlib.Path, workdir: pathlib.Path, args: argparse.Namespace) -> str:
    services, rpcs, engineers = scale
    t0 = time.perf_counter()
    policies = scale_policies(services, rpcs, engineers)
    # The benchmark's caller and method go LAST: RBAC matches policies and their lists in order.
    eng = policies[0]
    policies[0] = Policy(eng.name, [*eng.principals, ENGINEER], [*eng.paths, PATH])
    gen_s = time.perf_counter() - t0
    size = policy_bytes(policies)
    small_size = policy_bytes([Policy("v1/engineers", [ENGINEER], [PATH])])
    cfg = with_static_fast_path(gateway(ours_port), policies, flush_interval_s=1.0)
    started = time.perf_counter()
    big = EnvoyProcess(cfg, workdir / "scale", name="envoy-scale", concurrency=args.envoy_concurrency)
    try:
        big.wait_ready(timeout=300)
        load_s = time.perf_counter() - started
        check_call(big.port, token)
        mem_small, mem_big = _memory(small_envoy), _memory(big)
        p50 = {}
        for name, e in (("small", small_envoy), ("scale", big)):
            cells = [run_h2load(e.port, token, body, 1, args.duration, args.warmup, workdir, f"scale-{name}")
                     for _ in range(max(1, args.repeat))]
            p50[name] = statistics.median(c.p50_ms for c in cells)
    finally:
        big.stop()
    n_principals = sum(len(p.principals) for p in policies)
    n_paths = sum(len(p.paths) for p in policies)

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"
    rows = [
        ("policies (engineers + one per service with contributor-only RPCs)", f"{len(policies)}", "1"),
        ("principal matchers / path matchers", f"{n_principals} / {n_paths}", "1 / 1"),
        ("compiled RBAC policy (serialized proto)", f"{size / 1024:.0f} KiB", f"{small_size} B"),
        ("Envoy memory allocated (admin /memory)", mib(mem_big.get("allocated", 0)), mib(mem_small.get("allocated", 0))),
        ("Envoy heap size", mib(mem_big.get("heap_size", 0)), mib(mem_small.get("heap_size", 0))),
        ("Envoy start to ready with the static config (not an xDS push)", f"{load_s:.1f} s", "-"),
        ("fast-path p50 at c=1, caller and method last in the policy", f"{p50['scale']:.2f} ms", f"{p50['small']:.2f} ms"),
        ("xDS push time", "n/a (needs fastA's ADS server)", "-"),
        ("grant change to Envoy lag", "n/a (needs fastA's ADS server)", "-"),
    ]
    out = [f"scale: {services} services, {rpcs} RPCs, {engineers} engineers (generated in {gen_s:.1f} s; STATIC RBAC "
           "config of that size, not fastA's compiler)",
           "| measure | at scale | one engineer, one method |", "|---|---:|---:|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
