"""The fast path's policy in shards at the issue's scale: what one grant change sends (issue 12).

The organisation of bench/fastpath_policy_bench.py (10,000 engineers, 2,500 services, 6,000
RPCs, teams of 8 owning 2 services each). For each shard count (1 = the policy whole, one
ECDS resource) the real ADS server (``fastpath.xds``) serves the compiled parts to the real
Envoy (``dispatch_filter``, or the plain RBAC filter unsharded), and the bench prints:

* the whole policy: compile time, size, publish -> Envoy's ACK, Envoy's memory;
* one grant change each of two kinds (a new engineer; a contributor grant revoked): the
  compile (``compile_shards`` with the previous parts), how many parts changed, the bytes
  sent to each Envoy, and publish -> ACK.

Sharding trades memory (every part holds every path) for small updates; Envoy's per-call cost
of the dispatch is in bench/envoy_instructions.py (``fast_sharded_no_audit``).

    python bench/fastpath_shards_bench.py [--quick] [--shards 1 8 32]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from fastpath_policy_bench import Control, envoy_config, envoy_memory, organisation  # noqa: E402

from devstack.processes import EnvoyProcess  # noqa: E402
from fastpath.compile import compile_shards, shard_names, shard_of  # noqa: E402
from fastpath.envoy_config import dispatch_filter, rbac_filter  # noqa: E402
from policy import Grant, GrantSet, Mode, Role  # noqa: E402
from policy.grant_delta import GrantChange, GrantDelta  # noqa: E402


def sharded_envoy_config(xds_port: int, principal: str, shards: int) -> dict[str, Any]:
    """fastpath_policy_bench's Envoy (a fixed verified principal) with the policy in ``shards``."""
    cfg = envoy_config(xds_port, principal)
    filters = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    at = next(i for i, f in enumerate(filters) if f == rbac_filter())
    filters[at] = rbac_filter() if shards == 1 else dispatch_filter(shards)
    return cfg


def one(shards: int, modes: dict, grants: GrantSet, people: list[str], work: pathlib.Path) -> dict[str, float]:
    now = datetime.now(UTC)
    kw: dict[str, Any] = {"shards": shards, "default_mode": Mode.BREAK_GLASS_ONLY}
    t0 = time.perf_counter()
    parts = compile_shards(modes, grants, now, **kw)
    fig = {"compile (s)": time.perf_counter() - t0, "policy (MB)": sum(p.size_bytes for p in parts) / 1e6,
           "largest part (MB)": max(p.size_bytes for p in parts) / 1e6}
    control = Control(shard_names(shards), ttl_s=600)
    envoy = EnvoyProcess(sharded_envoy_config(control.port, people[0], shards), work / f"k{shards}",
                         log_level="error").wait_ready()
    try:
        fig["publish -> ACK, whole (s)"] = control.push_parts("1", parts)
        fig["Envoy memory (MB)"] = envoy_memory(envoy.admin_port) / 1e6
        changes = {
            "new engineer": GrantChange(Grant("new-hire@corp.example", Role.ENGINEER)),
            "contributor revoked": GrantChange(
                next(g for g in grants if g.role is Role.CONTRIBUTOR and g.principal == people[-1]), deleted=True),
        }
        revision, current = 1, grants
        for version, (what, change) in enumerate(changes.items(), start=2):
            current = current.apply(GrantDelta(revision, revision + 1, (change,)))
            revision += 1
            t0 = time.perf_counter()
            parts2 = compile_shards(modes, current, now, previous=parts, **kw)
            fig[f"{what}: compile (s)"] = time.perf_counter() - t0
            changed = [p for p, q in zip(parts2, parts, strict=True) if p.content != q.content]
            assert len(changed) == 1 and parts2.index(changed[0]) == shard_of(change.grant.principal, shards), changed
            fig[f"{what}: parts sent"] = len(changed)
            fig[f"{what}: bytes sent (MB)"] = sum(p.size_bytes for p in changed) / 1e6
            fig[f"{what}: publish -> ACK (s)"] = control.push_parts(str(version), parts2)
            parts = parts2
    finally:
        envoy.stop()
        control.stop()
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/10 of the organisation")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    size = (1000, 250, 600) if args.quick else (10_000, 2_500, 6_000)
    modes, grants, people = organisation(*size)
    print(f"organisation: {size[0]:,} engineers, {size[1]:,} services, {size[2]:,} RPCs, {len(grants):,} grants")
    with tempfile.TemporaryDirectory(prefix="fastpath-shards-") as tmp:
        figs = {k: one(k, modes, grants, people, pathlib.Path(tmp)) for k in args.shards}
    keys = list(next(iter(figs.values())))
    print()
    print("| figure | " + " | ".join(f"{k} shard{'s' if k > 1 else ''}" for k in args.shards) + " |")
    print("|---|" + "---:|" * len(args.shards))
    for key in keys:
        cells = []
        for k in args.shards:
            v = figs[k][key]
            cells.append(f"{v:.0f}" if key.endswith("parts sent") else f"{v:.3f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
