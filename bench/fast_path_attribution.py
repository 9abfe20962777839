"""Where does a fast-path allow's cost go inside Envoy? Each piece of the rendered fast path
left out in turn, and the audit's two possible sinks, against the same run's baseline.

bench/fast_path_bench.py measures the fast path as shipped against Envoy + jwt_authn
(issue 12's goal). This one attributes the difference: real Envoys rendered from the same
gateway.yaml in front of the same demo service, our ext_authz server serving the RBAC policy
over ADS, h2load driving an allowed call, interleaved rounds. Scenarios:

  baseline       Envoy + jwt_authn, no ext_authz                          (the goal's 1.00x)
  fast_no_audit  the fast path as rendered, its access log left out       (the reference below)
  no_ext_authz   ... and without the ext_authz filter (inside Envoy's composite filter, made
                 only for calls RBAC did not allow: what the gate itself costs)
  no_strip       ... and without the filter that drops client ``x-rpcauthz-*`` headers
  no_headers     ... and without the upstream headers filled from metadata
  audit_als      the fast path as shipped: the http_grpc access log to our server (ALS)
  audit_als_sink the same access log to a sink that only drains the stream (bench/als_sink.py,
                 another process): what ALS costs Envoy with no receiver's work beside it
  audit_file     the same filter, Envoy's file access log instead (JSON lines on local disk;
                 nothing reads them: Envoy's side of a file sink only)

The three ``no_*`` gateways are NOT deployable (each drops a part the design needs: the
check of calls RBAC did not allow, the strip of forged headers, the principal header the
upstream reads); they exist to price each part. Printed: throughput and p50 against
``fast_no_audit`` (per round, median and range) and against the baseline, and CPU per call of
Envoy, our server and the upstream with h2load.

    python bench/fast_path_attribution.py                      # c=16, 3 rounds of 5 s
    python bench/fast_path_attribution.py --concurrency 1 16 --duration 10
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.fast_path_bench import (  # noqa: E402
    ENGINEER,
    cpu_table,
    demo_gateway,
    interleaved_rounds,
    running_fast_path_server,
    start_envoy,
    until_fast,
    without_audit,
)
from bench.gateway_bench import Cell, check_call, demo_backends, stop_all  # noqa: E402
from devstack.processes import ManagedProcess, free_port, wait_serving  # noqa: E402
from fastpath.envoy_config import (  # noqa: E402
    EXT_AUTHZ_FILTER,
    JWT_FILTER,
    RBAC_NAMESPACE,
    SHADOW_POLICY_KEY,
    audit_access_log,
)

ORDER = ["baseline", "fast_no_audit", "no_ext_authz", "no_strip", "no_headers", "audit_als", "audit_als_sink",
         "audit_file"]
REFERENCE = "fast_no_audit"


def _hcms(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [f["typed_config"] for listener in cfg["static_resources"]["listeners"]
            for chain in listener["filter_chains"] for f in chain["filters"]
            if "http_filters" in f.get("typed_config", {})]


def without_filter(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """``cfg`` (a fast-path gateway without its audit) without the HTTP filter ``name``."""
    out = without_audit(cfg)
    for hcm in _hcms(out):
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != name]
    return out


def without_upstream_headers(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a fast-path gateway without its audit) without the virtual hosts' headers."""
    out = without_audit(cfg)
    for hcm in _hcms(out):
        for vh in hcm["route_config"]["virtual_hosts"]:
            vh.pop("request_headers_to_add", None)
    return out


def with_file_audit(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """``cfg`` with the http_grpc log of fast-path allows swapped for Envoy's file log (the
    same filter), one JSON line per call with what an audit event needs."""
    out = json.loads(json.dumps(cfg))
    als = audit_access_log()
    for hcm in _hcms(out):
        for i, log in enumerate(hcm.get("access_log", [])):
            if log["name"] == als["name"]:
                hcm["access_log"][i] = {
                    "name": "envoy.access_loggers.file", "filter": log["filter"],
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": path,
                        "log_format": {"json_format": {
                            "at": "%START_TIME(%s.%6f)%",
                            "principal": f"%DYNAMIC_METADATA({JWT_FILTER}:jwt_payload:sub)%",
                            "path": "%REQ(:PATH)%",
                            "policy": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_POLICY_KEY})%",
                            "request_id": "%REQ(X-REQUEST-ID)%", "stream": "%STREAM_ID%",
                            "peer": "%DOWNSTREAM_REMOTE_ADDRESS%"}}}}
    return out


def with_als_to(cfg: dict[str, Any], port: int) -> dict[str, Any]:
    """``cfg`` with its http_grpc access log sent to 127.0.0.1:``port`` (cluster ``als_sink``,
    the ext_authz cluster's settings less its health checks: the sink serves no health)."""
    out = json.loads(json.dumps(cfg))
    clusters = out["static_resources"]["clusters"]
    sink = json.loads(json.dumps(next(c for c in clusters if c["name"] == "ext_authz")))
    sink["name"] = sink["load_assignment"]["cluster_name"] = "als_sink"
    for key in ("health_checks", "outlier_detection", "transport_socket"):
        sink.pop(key, None)
    for group in sink["load_assignment"]["endpoints"]:
        for lb in group["lb_endpoints"]:
            lb["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    clusters.append(sink)
    als = audit_access_log()
    for hcm in _hcms(out):
        for log in hcm.get("access_log", []):
            if log["name"] == als["name"]:
                log["typed_config"]["common_config"]["grpc_service"] = {"envoy_grpc": {"cluster_name": "als_sink"}}
    return out


def start_sink(workdir: pathlib.Path, things: list[Any]) -> int:
    """bench/als_sink.py in its own process, serving (added to ``things``); its port."""
    port = free_port()
    proc = ManagedProcess("als-sink", [sys.executable, str(ROOT / "bench" / "als_sink.py"), str(port)],
                          workdir / "als-sink.log")
    things.append(proc)
    wait_serving(f"127.0.0.1:{port}", 30, check=proc.check_alive)
    return port


def sink_line(envoy: Any) -> str:
    """What the sink's gateway sent it, by Envoy's own access-log counters."""
    stats = envoy.stats("access_logs.grpc_access_log.")
    sent, dropped = (int(stats.get(f"access_logs.grpc_access_log.{k}") or 0) for k in ("logs_written", "logs_dropped"))
    return f"audit_als_sink: Envoy wrote {sent} access-log entries to the sink and dropped {dropped}"


def ratios(rounds: list[list[Cell]]) -> str:
    """Each scenario against the reference and the baseline, per round: median [min-max]."""
    out = ["| scenario | concurrency | throughput vs fast_no_audit | p50 vs fast_no_audit "
           "| throughput vs baseline | p50 vs baseline |", "|---|---:|---:|---:|---:|---:|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]" if values else "-"
    for conc in sorted({c.concurrency for r in rounds for c in r}):
        for name in ORDER:
            per: dict[str, list[float]] = {"tr": [], "pr": [], "tb": [], "pb": []}
            for r in rounds:
                by = {c.scenario: c for c in r if c.concurrency == conc}
                me, ref, base = by.get(name), by.get(REFERENCE), by.get("baseline")
                if me is None or ref is None or base is None or not (ref.rps and base.rps):
                    continue
                per["tr"].append(me.rps / ref.rps)
                per["pr"].append(me.p50_ms / ref.p50_ms)
                per["tb"].append(me.rps / base.rps)
                per["pb"].append(me.p50_ms / base.p50_ms)
            out.append(f"| {name} | {conc} | {cell(per['tr'])} | {cell(per['pr'])} | {cell(per['tb'])} "
                       f"| {cell(per['pb'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; cells report the median")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    args = ap.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-attribution-"))
    things: list[Any] = []
    try:
        issuer, jwks, upstream, body = demo_backends(workdir, things)
        token = issuer.mint(ENGINEER, ttl_seconds=3600)
        ours = running_fast_path_server(workdir, upstream.address, things)

        def gateway(ext: int | None) -> dict[str, Any]:
            return demo_gateway(jwks.port, upstream.port, ext, fast_path=ext is not None)
        configs = {
            "baseline": gateway(None),
            "fast_no_audit": without_audit(gateway(ours.port)),
            "no_ext_authz": without_filter(gateway(ours.port), EXT_AUTHZ_FILTER),
            "no_strip": without_filter(gateway(ours.port), "rpcauthz_strip_client_headers"),
            "no_headers": without_upstream_headers(gateway(ours.port)),
            "audit_als": gateway(ours.port),
            "audit_als_sink": with_als_to(gateway(ours.port), start_sink(workdir, things)),
            "audit_file": with_file_audit(gateway(ours.port), str(workdir / "fast-path-allows.log")),
        }
        envoys = {name: start_envoy(name, cfg, workdir, args.envoy_concurrency) for name, cfg in configs.items()}
        things.extend(envoys.values())
        for e in envoys.values():
            e.wait_ready()
        for name, e in envoys.items():
            check_call(e.port, token)
            if name != "baseline":
                until_fast(e, token)
        rounds, cpu = interleaved_rounds(ORDER, {name: (e, token) for name, e in envoys.items()},
                                         ours, body, workdir, args)
        print(f"{len(rounds)} round(s) of {args.duration:g} s per cell, Envoy --concurrency {args.envoy_concurrency}; "
              "the no_* gateways are NOT deployable (each prices one part of the fast path)")
        print(ratios(rounds))
        print()
        print(cpu_table(cpu))
        print()
        print(sink_line(envoys["audit_als_sink"]))
        return 0
    finally:
        stop_all(things, workdir)


if __name__ == "__main__":
    sys.exit(main())
