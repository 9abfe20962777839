"""Memory reads per warm check at the demo's size and at 10,000 engineers, counted by cachegrind.

A warm check's wall time on a shared 2-CPU machine moves by more than the difference
between sizes (issue 13: large/small <= 1.1x), so this counts what makes that difference
instead: instructions and data reads that miss the caches, per check, with
``valgrind --tool=cachegrind --cache-sim=yes`` (last level 1 MB per core, as here).

The check is scale_bench's (``_decision_figures``' checker: a random service, method and
engineer each time, fresh strings as a request's are), run on the same caches the server
holds: a ``GrantSet`` of the organisation's grants (as scale_bench's ``synthetic_grants``)
and a ``ReflectionCache`` filled with every service (no network: a stub client answers
with each service's ``ServiceModes``), the start-up heap frozen as the server freezes it.
Shape ``pipeline`` is what ``extauthz.pipeline`` does for a warm check's target and mode (and
scale_bench's checker with it): ``fresh_target`` where the cache has it, else (the code before
it) ``target.parse_path``, every path parsed once before counting as in a long-running
server, then ``fresh_mode``. Shape ``bench`` is scale_bench's checker before ``fresh_target``:
``fresh_mode`` and a ``Target`` made afresh.

Per check = (run of ``n2`` checks - run of ``n1`` checks) / (n2 - n1), with one hash seed, so
start-up (building the caches) cancels out.

    python bench/warm_check_misses.py                # both sizes, both shapes, under valgrind
    python bench/warm_check_misses.py --one large 1000 bench   # one run, no valgrind
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def warm_caches(org):  # -> tuple[policy.GrantSet, ReflectionCache]
    """The caches a server holds for ``org``, warm: a ``GrantSet`` of its grants (as
    scale_bench's ``synthetic_grants``), the start-up heap frozen as the server freezes it,
    then a ``ReflectionCache`` filled with every service (no network: a stub client answers
    with each service's ``ServiceModes``). Close the cache when done."""
    from extauthz.heap import freeze_long_lived
    from policy import Mode
    from reflection_cache.cache import CacheSettings, ReflectionCache
    from reflection_cache.types import ServiceModes

    sys.path.insert(0, str(ROOT / "bench"))
    import scale_bench as sb

    class StubClient:
        async def fetch(self, service: str, endpoint: str, *, deadline: float | None = None) -> ServiceModes:
            s = int(service.split(".")[1][1:])
            return ServiceModes(service, {m: sb.default_method_mode(s, m) and Mode(sb.default_method_mode(s, m))
                                          for m in sb.methods_of(org, s)},
                                service_default=Mode.CONTRIBUTORS_WITH_APPROVAL)

        async def close(self) -> None:
            pass

    class AnyEndpoint:
        def resolve(self, service: str) -> str:
            return "127.0.0.1:1"

    grants = sb.synthetic_grants(org)
    freeze_long_lived()
    cache = ReflectionCache(AnyEndpoint(), CacheSettings(ttl=3600, stale_window=3600),  # type: ignore[arg-type]
                            client=StubClient())  # type: ignore[arg-type]
    for s in range(org.services):
        await cache.get(sb.service_name(s))
    return grants, cache


def _run(size: str, n: int, shape: str) -> None:
    """Build the caches of ``size``, then run ``n`` warm checks of ``shape``."""
    import policy
    from extauthz.target import parse_path
    from policy import Mode, Target

    sys.path.insert(0, str(ROOT / "bench"))
    import scale_bench as sb

    org = sb.LARGE if size == "large" else sb.SMALL

    async def main() -> None:
        grants, cache = await warm_caches(org)
        rng = random.Random(2)
        default = Mode.BREAK_GLASS_ONLY
        fresh_target = getattr(cache, "fresh_target", None)

        def bench_check() -> None:
            s = rng.randrange(org.services)
            m = rng.choice(sb.methods_of(org, s))
            found = cache.fresh_mode(f"/{sb.service_name(s)}/{m}", default)
            assert found is not None
            policy.decide(sb.email(rng.randrange(org.engineers)), Target(sb.service_name(s), m), found[0],
                          grants, (), NOW)

        def pipeline_check() -> None:
            s = rng.randrange(org.services)
            path = f"/{sb.service_name(s)}/{rng.choice(sb.methods_of(org, s))}"
            principal = sb.email(rng.randrange(org.engineers))
            if fresh_target is not None:
                hit = fresh_target(path, default)
                assert hit is not None
                target, mode = hit[0], hit[1][0]
            else:
                target = parse_path(path, 512)
                found = cache.fresh_mode(path, default)
                assert found is not None
                mode = found[0]
            policy.decide(principal, target, mode, grants, (), NOW)

        check = bench_check if shape == "bench" else pipeline_check
        for s in range(org.services):  # every path seen once, as a long-running server has
            for m in sb.methods_of(org, s):
                parse_path(f"/{sb.service_name(s)}/{m}", 512)
        for _ in range(n):
            check()
        await cache.close()

    asyncio.run(main())


_SUMMARY = re.compile(r"^summary:\s+(.*)$", re.M)
_EVENTS = re.compile(r"^events:\s+(.*)$", re.M)


def _count(size: str, n: int, shape: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cg.out"
        subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--LL=1048576,16,64",
                        f"--cachegrind-out-file={out}", sys.executable, __file__, "--one", size, str(n), shape],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        text = out.read_text()
    events = _EVENTS.search(text)
    summary = _SUMMARY.search(text)
    assert events and summary, "no cachegrind summary"
    return dict(zip(events.group(1).split(), map(int, summary.group(1).split()), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("SIZE", "N", "SHAPE"), help="one run (no valgrind)")
    ap.add_argument("--n1", type=int, default=2000)
    ap.add_argument("--n2", type=int, default=12000)
    ap.add_argument("--shapes", default="bench,pipeline")
    args = ap.parse_args()
    if args.one:
        size, n, shape = args.one
        _run(size, int(n), shape)
        return
    print("| shape | size | instructions | D1 read misses | LL data read misses |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        for size in ("small", "large"):
            a, b = _count(size, args.n1, shape), _count(size, args.n2, shape)
            per = {k: (b[k] - a[k]) / (args.n2 - args.n1) for k in a}
            print(f"| {shape} | {size} | {per['Ir']:,.0f} | {per['D1mr']:.1f} | {per['DLmr']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
