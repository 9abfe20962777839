"""What does an authorization decision cost at the gateway?

Runs, in one go and on the same machine, three real Envoys with the same gateway.yaml
(jwt_authn included in all three) in front of the same demo gRPC service:

  baseline   Envoy with no ext_authz filter
  noop       Envoy + a no-op ext_authz server (grpc.aio, answers OK at once): the floor
             any ext_authz server pays for the extra hop
  rpcauthz   Envoy + our server (SQLite store, reflection cache, grants in memory), warm

and drives each with h2load (gRPC over h2c, a prebuilt request body) at concurrency 1
and 16, for a fixed time after a warm-up. Prints p50/p99 latency and throughput, and
the ratios against the baseline and against the no-op floor measured in the same run.

    python bench/gateway_bench.py                  # 10 s per cell
    python bench/gateway_bench.py --duration 3 --concurrency 1 16
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extauthz.body import frame  # noqa: E402
from extauthz.processes import (EnvoyProcess, ExtAuthzProcess, ManagedProcess, free_port,  # noqa: E402
                                render_gateway, wait_serving)

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
PATH = f"/{ACCOUNTS}/ListAccounts"  # ENGINEERS_WITHOUT_APPROVAL: an allow from memory


@dataclasses.dataclass
class Cell:
    scenario: str
    concurrency: int
    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def run_h2load(port: int, token: str, body: pathlib.Path, concurrency: int, duration: float,
               warmup: float, workdir: pathlib.Path, name: str) -> Cell:
    log = workdir / f"h2load-{name}-{concurrency}.log"
    argv = ["h2load", "-c", str(concurrency), "-m", "1", "-t", "1",
            "-D", f"{int(duration * 1000)}ms", f"--warm-up-time={int(warmup * 1000)}ms", "-d", str(body), "--log-file", str(log),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{PATH}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    if r.returncode != 0:
        raise RuntimeError(f"h2load failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    times, ok, total = [], 0, 0
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        total += 1
        if parts[1] == "200":
            ok += 1
            times.append(int(parts[2]) / 1000.0)  # microseconds -> ms
    if not times:
        raise RuntimeError(f"no successful requests for {name}:\n{r.stdout}")
    times.sort()
    q = statistics.quantiles(times, n=100, method="inclusive") if len(times) > 1 else times * 99
    return Cell(name, concurrency, total, ok, duration, q[49], q[98])


def _noop_server(port: int, workdir: pathlib.Path) -> ManagedProcess:
    proc = ManagedProcess("noop-extauthz", [sys.executable, str(ROOT / "bench" / "noop_extauthz.py"),
                                            "--port", str(port)], workdir / "noop.log")
    wait_serving(f"127.0.0.1:{port}", 30, check=proc.check_alive)
    return proc


def check_call(port: int, token: str) -> None:
    """One real gRPC call through the gateway must succeed before we time anything."""
    from extauthz.democlient import call

    result = call(f"127.0.0.1:{port}", PATH, token=token)
    if result.code.name != "OK":
        raise RuntimeError(f"sanity call through :{port} failed: {result.render()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--audit-allows", action="store_true",
                    help="write an audit event for every allow too (audit.allows; off by default here)")
    args = ap.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2

    from mpa.devissuer import DevIssuer
    from policy import Grant, Role
    from policy.stores import open_store
    from rpcauthz.demo.servers import start_demo_server
    from rpcauthz.demo.v1 import accounts_pb2

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-bench-"))
    things: list = []
    try:
        issuer = DevIssuer()
        jwks = issuer.serve()
        things.append(jwks)
        upstream = start_demo_server(services=("accounts", "ledger"), max_workers=32)
        things.append(upstream)
        token = issuer.mint("bench-engineer", ttl_seconds=3600)
        body = workdir / "request.bin"
        body.write_bytes(frame(accounts_pb2.AccountRequest(account_id="A-1").SerializeToString()))

        store_url = f"sqlite:///{workdir / 'bench.db'}"
        store = open_store(store_url)
        store.put_grant(Grant("bench-engineer", Role.ENGINEER))
        store.close()
        ours_port, noop_port = free_port(), free_port()
        ours = ExtAuthzProcess({
            "store_url": store_url, "listen": {"host": "127.0.0.1", "port": ours_port},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "audit": {"allows": args.audit_allows},
            "reflection": {"endpoints": {"static": {ACCOUNTS: upstream.address}}},
        }, workdir, env={"PYTHONWARNINGS": "ignore"})
        things.append(ours)
        ours.wait_ready()
        things.append(_noop_server(noop_port, workdir))

        envoys = {}
        for name, ext_port in (("baseline", None), ("noop", noop_port), ("rpcauthz", ours_port)):
            cfg = render_gateway(listen_port=free_port(), admin_port=free_port(), extauthz_port=ext_port,
                                 jwks_port=jwks.port, upstreams={"demo_accounts": upstream.port,
                                                                 "demo_ledger": upstream.port},
                                 access_log="/dev/null")
            e = EnvoyProcess(cfg, workdir / name, name=f"envoy-{name}",
                             concurrency=args.envoy_concurrency)
            things.append(e)
            envoys[name] = e
        for e in envoys.values():
            e.wait_ready()
        for name, e in envoys.items():
            check_call(e.port, token)  # also warms reflection and connections

        cells: list[Cell] = []
        for c in args.concurrency:
            for name, e in envoys.items():
                cells.append(run_h2load(e.port, token, body, c, args.duration, args.warmup, workdir, name))
        print(render(cells))
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
    by = {(c.scenario, c.concurrency): c for c in cells}
    out = ["| scenario | concurrency | requests ok | throughput (req/s) | p50 (ms) | p99 (ms) "
           "| throughput vs baseline | p50 vs baseline | p99 vs baseline | throughput vs noop | p50 vs noop | p99 vs noop |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        base = by.get(("baseline", c.concurrency))
        noop = by.get(("noop", c.concurrency))

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "-"
        out.append(f"| {c.scenario} | {c.concurrency} | {c.ok} | {c.rps:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
                   f"| {ratio(c.rps, base.rps)} | {ratio(c.p50_ms, base.p50_ms)} | {ratio(c.p99_ms, base.p99_ms)} "
                   f"| {ratio(c.rps, noop.rps)} | {ratio(c.p50_ms, noop.p50_ms)} | {ratio(c.p99_ms, noop.p99_ms)} |")
    summary = []
    for conc in sorted({c.concurrency for c in cells}):
        ours, noop = by.get(("rpcauthz", conc)), by.get(("noop", conc))
        if ours and noop:
            summary.append(f"concurrency {conc}: rpcauthz costs {100 * (ours.p50_ms / noop.p50_ms - 1):+.0f}% p50, "
                           f"{100 * (ours.p99_ms / noop.p99_ms - 1):+.0f}% p99 and "
                           f"{100 * (ours.rps / noop.rps - 1):+.0f}% throughput against the no-op floor")
    return "\n".join(out + [""] + summary)


if __name__ == "__main__":
    sys.exit(main())
