"""The fast path's policy at the issue's scale, against a same-run baseline (issue 12).

Builds an organisation of 10,000 engineers, 2,500 services and 6,000 RPCs (teams of 8
engineers owning 2 services each; modes mixed: 40% ENGINEERS_WITHOUT_APPROVAL, 30%
CONTRIBUTORS_WITHOUT_APPROVAL, the rest approval modes), compiles it (``fastpath.compile``),
serves it from the real ADS server (``fastpath.xds``) to the real Envoy (the gateway's
fast-path filters: the client-header strip, then RBAC; a fixed verified principal), and prints:

* compile time and the size of one push; Envoy's memory with the empty and the big policy;
* push time (publish -> Envoy's ACK), and a grant change end to end (delta -> compile ->
  push -> ACK);
* Envoy's own cost per request: h2load at c=1 and c=16 against a listener that runs only the
  fast-path filters and answers directly, with the empty policy (baseline, 1.00x) and with
  the big one: an engineer's call, a contributor's call to the last service, and a refused
  call (every regex tested).

    python bench/fastpath_policy_bench.py [--quick] [--seconds 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import grpc  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc  # noqa: E402
from gateway_bench import run_h2load  # noqa: E402

from devstack.processes import EnvoyProcess, free_port  # noqa: E402
from fastpath.compile import compile_policy, empty_policy  # noqa: E402
from fastpath.envoy_config import RE2_MAX_PROGRAM_SIZE, rbac_filter, strip_filter  # noqa: E402
from fastpath.xds import FastPathXds  # noqa: E402
from policy import Grant, GrantSet, Mode, Role  # noqa: E402
from policy.grant_delta import GrantChange, GrantDelta  # noqa: E402
from reflection_cache.types import ServiceModes  # noqa: E402

MODES = ([Mode.ENGINEERS_WITHOUT_APPROVAL] * 4 + [Mode.CONTRIBUTORS_WITHOUT_APPROVAL] * 3
         + [Mode.ENGINEERS_WITH_APPROVAL, Mode.CONTRIBUTORS_WITH_APPROVAL, Mode.BREAK_GLASS_ONLY])


def organisation(engineers: int, services: int, rpcs: int, seed: int = 12):
    rnd = random.Random(seed)
    people = [f"engineer-{i:05d}@corp.example" for i in range(engineers)]
    names = [f"acme.team{i // 2:04d}.v1.Service{i:04d}" for i in range(services)]
    per = [2] * services
    for i in rnd.sample(range(services), rpcs - 2 * services):
        per[i] = 3
    modes = {s: ServiceModes(s, {f"Method{j}": rnd.choice(MODES) for j in range(n)})
             for s, n in zip(names, per, strict=True)}
    grants = [Grant(p, Role.ENGINEER) for p in people]
    for i, s in enumerate(names):  # team t (8 people) owns services 2t and 2t+1
        team = (i // 2) % (engineers // 8)
        grants += [Grant(p, Role.CONTRIBUTOR, s) for p in people[team * 8:team * 8 + 8]]
    return modes, GrantSet(grants, revision=1), people


def envoy_config(xds_port: int, principal: str) -> dict:
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                             "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "layered_runtime": {"layers": [{"name": "re2", "static_layer": {
            "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
            "re2.max_program_size.warn_level": RE2_MAX_PROGRAM_SIZE}}]},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                               "stat_prefix": "b", "codec_type": "AUTO",
                               "http_filters": [
                                   {"name": "envoy.filters.http.set_metadata", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                                       "metadata": [{"metadata_namespace": "envoy.filters.http.jwt_authn",
                                                     "value": {"jwt_payload": {"sub": principal}}}]}},
                                   strip_filter(),
                                   rbac_filter(),
                                   {"name": "envoy.filters.http.router", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                               "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
                                   {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}}}]}]}],
            "clusters": [{"name": "xds", "type": "STATIC", "connect_timeout": "0.25s",
                          "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                              "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                              "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 16}}}},
                          "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                              "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}}]},
    }


class Control:
    """The ADS server (serving ``names``) on its own event loop thread."""

    def __init__(self, names: list[str] | None = None, ttl_s: float = 60) -> None:
        self.port = free_port()
        self.xds = FastPathXds(ttl_s=ttl_s, **({"names": names} if names else {}))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.run(self._start())

    async def _start(self) -> None:
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.xds, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)

    def push(self, version: str, rbac) -> float:
        """Seconds from publishing ``rbac`` (the whole policy) to Envoy's ACK of ``version``."""
        return self._pushed(version, lambda: self.xds.publish(version, rbac))

    def push_parts(self, version: str, parts) -> float:
        """Seconds from publishing compiled ``parts`` (``compile_shards``) to Envoy's ACK of ``version``."""
        return self._pushed(version, lambda: self.xds.publish_parts(version, parts))

    def _pushed(self, version: str, publish_now) -> float:
        async def publish() -> None:
            publish_now()
        t0 = time.perf_counter()
        self.run(publish())
        while not any(s.acked_version == version for s in self.xds.status()):
            if any(s.nacks for s in self.xds.status()):
                raise RuntimeError(f"Envoy refused the policy: {self.xds.status()[0].last_nack}")
            time.sleep(0.001)
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)


def envoy_memory(admin_port: int) -> int:
    import json
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/memory", timeout=5) as r:
        return int(json.load(r)["allocated"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/10 of the organisation")
    ap.add_argument("--seconds", type=float, default=3.0, help="h2load duration per cell")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are shown)")
    args = ap.parse_args()
    size = (1000, 250, 600) if args.quick else (10_000, 2_500, 6_000)
    modes, grants, people = organisation(*size)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    big = compile_policy(modes, grants, now, version="2", default_mode=Mode.BREAK_GLASS_ONLY)
    compile_s = time.perf_counter() - t0
    print(f"organisation: {size[0]:,} engineers, {size[1]:,} services, {size[2]:,} RPCs, {len(grants):,} grants")
    print(f"compiled: {big.engineer_paths:,} engineer paths, {big.engineers:,} engineers, "
          f"{big.contributor_services:,} contributor services, {big.size_bytes / 1e6:.2f} MB, "
          f"in {compile_s:.2f} s")

    # The worst cases: the last services by name (nothing in the matcher depends on the order).
    eng_path = next(f"/{s}/{m}" for s in sorted(modes, reverse=True) for m, md in modes[s].methods.items()
                    if md is Mode.ENGINEERS_WITHOUT_APPROVAL)
    last_cwa = next((s, m) for s in sorted(modes, reverse=True) for m, md in modes[s].methods.items()
                    if md is Mode.CONTRIBUTORS_WITHOUT_APPROVAL)
    idx = int(last_cwa[0].rsplit("Service", 1)[1])
    principal = people[((idx // 2) % (size[0] // 8)) * 8]
    assert grants.is_contributor(principal, last_cwa[0], now)
    denied_path = next(f"/{s}/{m}" for s in sorted(modes, reverse=True) for m, md in modes[s].methods.items()
                       if md is Mode.BREAK_GLASS_ONLY)

    control = Control()
    with tempfile.TemporaryDirectory(prefix="fastpath-bench-") as tmp:
        work = pathlib.Path(tmp)
        body = work / "body"
        body.write_bytes(b"\x00\x00\x00\x00\x00")
        envoy = EnvoyProcess(envoy_config(control.port, principal), work, log_level="error").wait_ready()
        try:
            control.push("1", empty_policy())
            mem_empty = envoy_memory(envoy.admin_port)
            push_s = control.push("2", big.rbac)
            mem_big = envoy_memory(envoy.admin_port)
            # One grant change end to end: a delta, a compile, a push, Envoy's ACK.
            t0 = time.perf_counter()
            changed = grants.apply(GrantDelta(1, 2, (GrantChange(Grant("new-hire@corp.example", Role.ENGINEER)),)))
            again = compile_policy(modes, changed, now, version="3", default_mode=Mode.BREAK_GLASS_ONLY)
            compile2 = time.perf_counter() - t0
            push2 = control.push("3", again.rbac)
            print(f"push (publish -> Envoy ACK): {push_s * 1000:.0f} ms; Envoy memory: "
                  f"{mem_empty / 1e6:.1f} MB empty policy, {mem_big / 1e6:.1f} MB big policy")
            print(f"grant change -> Envoy: compile {compile2 * 1000:.0f} ms + push/ACK {push2 * 1000:.0f} ms "
                  f"= {(compile2 + push2) * 1000:.0f} ms (plus the store's NOTIFY and the 0.1 s debounce)")

            cells: dict[tuple[str, int], tuple[float, float]] = {}
            scenarios = [("empty policy (baseline)", "1", empty_policy(), eng_path),
                         ("big: engineer call", "4", again.rbac, eng_path),
                         ("big: contributor, last service", "4", again.rbac, f"/{last_cwa[0]}/{last_cwa[1]}"),
                         ("big: refused call", "4", again.rbac, denied_path)]
            results: dict[str, str] = {}
            samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _round in range(args.rounds):  # interleaved: every scenario once per round
                for name, version, rbac, path in scenarios:
                    control.push(f"{version}{name[:3]}{_round}", rbac)
                    before = envoy.stats("http.b.rbac.rpcauthz_fast_.")
                    for c in (1, 16):
                        cell = run_h2load_path(envoy.port, body, c, args.seconds, work, path, name)
                        samples.setdefault((name, c), []).append((cell.rps, cell.p50_ms))
                    after = envoy.stats("http.b.rbac.rpcauthz_fast_.")
                    results[name] = ", ".join(f"{k.rsplit('.', 1)[1]}" for k in sorted(after)
                                              if after[k] != before.get(k))
            for key, vals in samples.items():
                cells[key] = (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
        finally:
            envoy.stop()
    print()
    print(f"{'Envoy, RBAC filter only (direct response)':34} {'c':>3} {'req/s':>9} {'x base':>7} {'p50 ms':>8} "
          f"{'x base':>7}  shadow result (medians of {args.rounds} interleaved rounds)")
    for (name, c), (rps, p50) in cells.items():
        base_rps, base_p50 = cells[("empty policy (baseline)", c)]
        print(f"{name:34} {c:>3} {rps:>9.0f} {rps / base_rps:>6.2f}x {p50:>8.3f} {p50 / base_p50:>6.2f}x  "
              f"{results[name] if c == 1 else ''}")
    return 0


def run_h2load_path(port: int, body: pathlib.Path, c: int, seconds: float, work: pathlib.Path, path: str, name: str):
    # The path is an argument: run_h2load's default is bound when gateway_bench is imported,
    # so patching gateway_bench.PATH (as this did) sent every scenario to the demo's path.
    return run_h2load(port, "x", body, c, seconds, 0.5, work, name.replace(" ", "_").replace(":", "").replace(",", ""),
                      path=path)


if __name__ == "__main__":
    raise SystemExit(main())
