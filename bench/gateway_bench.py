"""What does an authorization decision cost at the gateway?

Runs, in one go and on the same machine, three real Envoys with the same gateway.yaml
(jwt_authn included in all three) in front of the same demo gRPC service:

  baseline   Envoy with no ext_authz filter
  noop       Envoy + a no-op ext_authz server (grpc.aio, answers OK at once): the floor
             any ext_authz server pays for the extra hop
  rpcauthz   Envoy + our server (SQLite store, reflection cache, grants in memory), warm

and drives each with h2load (gRPC over h2c, a prebuilt request body) at concurrency 1
and 16, for a fixed time after a warm-up. The three scenarios run interleaved, ``--repeat``
rounds in alternating order (A B C, C B A, ...), so drifting load from other work on the
machine hits them alike; each cell reports the median over the rounds. Prints p50/p99
latency and throughput, the ratios against the baseline and against the no-op floor
measured in the same run, and the spread of the per-round rpcauthz/no-op ratios.

Our server runs with its defaults (every allow audited, in batches); ``--no-audit-allows``
turns that off. Both ext_authz servers use the same grpc.aio options and event loop.

    python bench/gateway_bench.py                  # 3 rounds of 10 s per cell
    python bench/gateway_bench.py --duration 3 --repeat 5 --concurrency 1 16
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devstack.processes import EnvoyProcess, ExtAuthzProcess, ManagedProcess, free_port, render_gateway, wait_serving  # noqa: E402
from tests.support.grpc_frames import frame  # noqa: E402

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
    #: Set on a cell that summarises rounds (the median of theirs); else ok / seconds.
    throughput: float | None = None
    #: CPU time the scenario's ext_authz server process used per answered request (µs).
    server_cpu_us: float | None = None

    @property
    def rps(self) -> float:
        if self.throughput is not None:
            return self.throughput
        return self.ok / self.seconds if self.seconds else 0.0


def run_h2load(port: int, token: str, body: pathlib.Path, concurrency: int, duration: float,
               warmup: float, workdir: pathlib.Path, name: str, path: str = PATH) -> Cell:
    log = workdir / f"h2load-{name}-{concurrency}.log"
    log.unlink(missing_ok=True)  # h2load appends: keep every round's requests apart
    argv = ["h2load", "-c", str(concurrency), "-m", "1", "-t", "1",
            "-D", f"{int(duration * 1000)}ms", f"--warm-up-time={int(warmup * 1000)}ms", "-d", str(body), "--log-file", str(log),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{path}"]
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid`` (key: "name/tid"), for ``--thread-cpu``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _noop_server(port: int, workdir: pathlib.Path) -> ManagedProcess:
    proc = ManagedProcess("noop-extauthz", [sys.executable, str(ROOT / "bench" / "noop_extauthz.py"),
                                            "--port", str(port)], workdir / "noop.log")
    wait_serving(f"127.0.0.1:{port}", 30, check=proc.check_alive)
    return proc


def demo_backends(workdir: pathlib.Path, things: list[Any]) -> tuple[Any, Any, Any, pathlib.Path]:
    """What every gateway bench runs behind Envoy: a dev JWT issuer serving its JWKS, the demo
    gRPC upstream (Accounts and Ledger, 32 workers) and h2load's request body (one framed
    AccountRequest, in ``workdir``). Returns (issuer, jwks server, upstream, body); the
    servers are appended to ``things`` for ``stop_all``."""
    from devstack.demo_services import start_demo_server
    from devstack.devissuer import DevIssuer
    from rpcauthz.demo.v1 import accounts_pb2

    issuer = DevIssuer()
    jwks = issuer.serve()
    things.append(jwks)
    upstream = start_demo_server(services=("accounts", "ledger"), max_workers=32)
    things.append(upstream)
    body = workdir / "request.bin"
    body.write_bytes(frame(accounts_pb2.AccountRequest(account_id="A-1").SerializeToString()))
    return issuer, jwks, upstream, body


def check_call(port: int, token: str, path: str = PATH, code: str = "OK") -> None:
    """One real gRPC call through the gateway must give ``code`` before we time anything."""
    from devstack.democlient import call

    result = call(f"127.0.0.1:{port}", path, token=token)
    if result.code.name != code:
        raise RuntimeError(f"sanity call {path} through :{port} gave {result.render()}, expected {code}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--audit-batch-window-ms", type=int, default=None,
                    help="audit.batch_window_ms for our server (default: the server's default)")
    ap.add_argument("--thread-cpu", action="store_true",
                    help="also print each ext_authz server thread's CPU time per cell")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of every cell, interleaved; cells report the median")
    ap.add_argument("--audit-allows", action=argparse.BooleanOptionalAction, default=True,
                    help="audit every allow (audit.allows, the server's default: on)")
    args = ap.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2

    from policy import Grant, Role
    from policy.stores import open_store

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-bench-"))
    things: list = []
    try:
        issuer, jwks, upstream, body = demo_backends(workdir, things)
        token = issuer.mint("bench-engineer", ttl_seconds=3600)

        store_url = f"sqlite:///{workdir / 'bench.db'}"
        store = open_store(store_url)
        store.put_grant(Grant("bench-engineer", Role.ENGINEER))
        store.close()
        ours_port, noop_port = free_port(), free_port()
        ours = ExtAuthzProcess({
            "store_url": store_url, "listen": {"host": "127.0.0.1", "port": ours_port}, "drain_notice_s": 0,
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "audit": {"allows": args.audit_allows, "spool_path": str(workdir / "audit-spool.db"),
                      **({} if args.audit_batch_window_ms is None
                         else {"batch_window_ms": args.audit_batch_window_ms})},
            "reflection": {"endpoints": {"static": {ACCOUNTS: upstream.address}}},
        }, workdir, env={"PYTHONWARNINGS": "ignore"})
        things.append(ours)
        ours.wait_ready()
        noop = _noop_server(noop_port, workdir)
        things.append(noop)
        server_pid = {"noop": noop.pid, "rpcauthz": ours.pid}

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
        for e in envoys.values():
            check_call(e.port, token)  # also warms reflection and connections

        rounds: list[list[Cell]] = []
        names = list(envoys)
        for i in range(max(1, args.repeat)):
            order = names if i % 2 == 0 else names[::-1]
            cells: list[Cell] = []
            for c in args.concurrency:
                for name in order:
                    pid = server_pid.get(name)
                    cpu = process_cpu_seconds(pid) if pid else 0.0
                    threads = thread_cpu_seconds(pid) if pid and args.thread_cpu else {}
                    cell = run_h2load(envoys[name].port, token, body, c, args.duration,
                                      args.warmup, workdir, name)
                    if pid:  # the CPU covers the warm-up too: count its requests at the same rate
                        served = cell.requests * (args.duration + args.warmup) / args.duration
                        cell.server_cpu_us = (process_cpu_seconds(pid) - cpu) * 1e6 / max(served, 1)
                    if threads:
                        after = thread_cpu_seconds(pid)
                        used = sorted(((after[k] - threads.get(k, 0.0), k) for k in after), reverse=True)
                        print(f"{name} c={c}: " + ", ".join(f"{k} {v:.2f}s" for v, k in used if v > 0),
                              flush=True)
                    cells.append(cell)
            rounds.append(cells)
        print(f"{len(rounds)} round(s) of {args.duration:g} s per cell, audit.allows "
              f"{'on' if args.audit_allows else 'off'}, Envoy --concurrency {args.envoy_concurrency}")
        print(render(median_cells(rounds), rounds))
        return 0
    finally:
        stop_all(things, workdir)


def stop_all(things: list[Any], workdir: pathlib.Path) -> None:
    """Stop what a benchmark started, last first (gRPC servers without grace), and remove its
    working directory; a failure to stop one is printed and the rest still stop."""
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


def median_cells(rounds: list[list[Cell]], order: list[str] | None = None) -> list[Cell]:
    """One cell per (scenario, concurrency): medians of p50, p99 and throughput over rounds,
    sorted by concurrency, then by scenario in ``order`` (default: this benchmark's)."""
    order = order or _ORDER
    groups: dict[tuple[str, int], list[Cell]] = {}
    for cells in rounds:
        for c in cells:
            groups.setdefault((c.scenario, c.concurrency), []).append(c)
    out = []
    for (scenario, conc), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        seconds = statistics.median(c.seconds for c in cs)
        out.append(Cell(scenario, conc, sum(c.requests for c in cs), sum(c.ok for c in cs),
                        seconds, statistics.median(c.p50_ms for c in cs),
                        statistics.median(c.p99_ms for c in cs),
                        throughput=statistics.median(c.rps for c in cs),
                        server_cpu_us=statistics.median(c.server_cpu_us for c in cs)
                        if all(c.server_cpu_us is not None for c in cs) else None))
    return out


_ORDER = ["baseline", "noop", "rpcauthz"]


def render(cells: list[Cell], rounds: list[list[Cell]] | None = None) -> str:
    by = {(c.scenario, c.concurrency): c for c in cells}
    out = ["| scenario | concurrency | requests ok | throughput (req/s) | p50 (ms) | p99 (ms) "
           "| throughput vs baseline | p50 vs baseline | p99 vs baseline | throughput vs noop | p50 vs noop | p99 vs noop |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"
    for c in cells:
        base = by.get(("baseline", c.concurrency))
        noop = by.get(("noop", c.concurrency))
        out.append(f"| {c.scenario} | {c.concurrency} | {c.ok} | {c.rps:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
                   f"| {ratio(c.rps, base.rps)} | {ratio(c.p50_ms, base.p50_ms)} | {ratio(c.p99_ms, base.p99_ms)} "
                   f"| {ratio(c.rps, noop.rps)} | {ratio(c.p50_ms, noop.p50_ms)} | {ratio(c.p99_ms, noop.p99_ms)} |")
    summary = []
    for conc in sorted({c.concurrency for c in cells}):
        ours, noop = by.get(("rpcauthz", conc)), by.get(("noop", conc))
        if not (ours and noop):
            continue
        line = (f"concurrency {conc}: rpcauthz costs {100 * (ours.p50_ms / noop.p50_ms - 1):+.0f}% p50, "
                f"{100 * (ours.p99_ms / noop.p99_ms - 1):+.0f}% p99 and "
                f"{100 * (ours.rps / noop.rps - 1):+.0f}% throughput against the no-op floor")
        paired = _paired_ratios(rounds or [], conc)
        if len(paired) > 1:
            p50s, rpss = [p for p, _ in paired], [r for _, r in paired]
            line += (f" (per-round ratios over {len(paired)} rounds: p50 {min(p50s):.2f}-{max(p50s):.2f}x, "
                     f"throughput {min(rpss):.2f}-{max(rpss):.2f}x)")
        if ours.server_cpu_us and noop.server_cpu_us:
            line += (f"; ext_authz server CPU per request {noop.server_cpu_us:.0f} µs (no-op) vs "
                     f"{ours.server_cpu_us:.0f} µs (rpcauthz), {ours.server_cpu_us / noop.server_cpu_us:.2f}x")
        met = ours.p50_ms <= 1.15 * noop.p50_ms and ours.rps >= noop.rps / 1.15
        summary.append(line + f"; within 15% of the floor (p50 and throughput): {'yes' if met else 'NO'}")
    return "\n".join(out + [""] + summary)


def _paired_ratios(rounds: list[list[Cell]], conc: int) -> list[tuple[float, float]]:
    """(p50, throughput) of rpcauthz over the no-op, per round (the two ran back to back)."""
    pairs = []
    for cells in rounds:
        by = {c.scenario: c for c in cells if c.concurrency == conc}
        if "rpcauthz" in by and "noop" in by and by["noop"].p50_ms and by["noop"].rps:
            pairs.append((by["rpcauthz"].p50_ms / by["noop"].p50_ms, by["rpcauthz"].rps / by["noop"].rps))
    return pairs


if __name__ == "__main__":
    sys.exit(main())
