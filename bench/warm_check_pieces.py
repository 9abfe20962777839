"""Where a warm check's extra time at 10,000 engineers goes, piece by piece, timed (issue 13).

scale_bench's warm check (a random service, method and engineer each time, fresh strings as
a request's are) grows from the demo's organisation to the large one by ~1.1-1.2x. This
times it in cumulative pieces, both sizes' caches held in one process (as
``warm_check_misses.warm_caches`` builds them: the server's ``GrantSet`` and a filled
``ReflectionCache``), in rounds that alternate the sizes so both see the machine alike:

    request strings      the path and principal made afresh (the bench's own part)
    + path index         ``ReflectionCache.fresh_target(path)``: target and mode
    + engineer           ``GrantSet.is_engineer(principal)``
    + contributor        ``GrantSet.is_contributor(principal, service)``
    whole check          ``fresh_target`` then ``policy.decide`` (scale_bench's check)

"large - small" of a row minus that of "request strings" in the same round is what its
piece itself adds at the large size. Every figure is a median over rounds; each round times
every piece at both sizes (its p50 of ``--n`` calls).

    python bench/warm_check_pieces.py [--rounds 15] [--n 1500]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import scale_bench as sb  # noqa: E402
from warm_check_misses import NOW, warm_caches  # noqa: E402

import policy  # noqa: E402
from policy import Mode  # noqa: E402

PIECES = ("request strings", "+ path index", "+ engineer", "+ contributor", "whole check")


def piece(name: str, org: sb.Org, grants: policy.GrantSet, cache, rng: random.Random) -> Callable[[], object]:
    """One timed call of ``name`` (a row of ``PIECES``) on ``org``'s caches."""
    fresh_target = cache.fresh_target
    default = Mode.BREAK_GLASS_ONLY

    def strings() -> tuple[int, str, str]:
        s = rng.randrange(org.services)
        return s, f"/{sb.service_name(s)}/{rng.choice(sb.methods_of(org, s))}", sb.email(rng.randrange(org.engineers))

    def request_strings() -> object:
        return strings()

    def path_index() -> object:
        _, path, _ = strings()
        return fresh_target(path, default)

    def engineer() -> object:
        _, _, principal = strings()
        return grants.is_engineer(principal, NOW)

    def contributor() -> object:
        s, _, principal = strings()
        return grants.is_contributor(principal, sb.service_name(s), NOW)

    def whole_check() -> object:
        _, path, principal = strings()
        hit = fresh_target(path, default)
        assert hit is not None, path
        return policy.decide(principal, hit[0], hit[1][0], grants, (), NOW)

    return dict(zip(PIECES, (request_strings, path_index, engineer, contributor, whole_check), strict=True))[name]


def p50_ns(fn: Callable[[], object], n: int) -> float:
    """The median of ``n`` timed calls of ``fn``, in nanoseconds."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return statistics.median(out)


async def measure(rounds: int, n: int, large: sb.Org = sb.LARGE) -> list[tuple[str, float, float, float, float, float]]:
    """(piece, small p50 ns, large p50 ns, large - small ns, large / small, the piece's own
    growth ns) per row of ``PIECES``: medians over rounds, each round timing every piece at
    both sizes, so a change of the machine's pace lands on all of them alike."""
    small_caches, large_caches = await warm_caches(sb.SMALL), await warm_caches(large)
    rng = random.Random(2)
    calls = [(piece(name, sb.SMALL, *small_caches, rng), piece(name, large, *large_caches, rng)) for name in PIECES]
    try:
        for small, big in calls:  # warm-up
            p50_ns(small, n), p50_ns(big, n)
        timed = [[(p50_ns(small, n), p50_ns(big, n)) for small, big in calls] for _ in range(rounds)]
    finally:
        await small_caches[1].close()
        await large_caches[1].close()
    rows = []
    for i, name in enumerate(PIECES):
        pairs = [r[i] for r in timed]
        own = statistics.median((b - s) - (r[0][1] - r[0][0]) for r, (s, b) in zip(timed, pairs, strict=True))
        rows.append((name, statistics.median(s for s, _ in pairs), statistics.median(b for _, b in pairs),
                     statistics.median(b - s for s, b in pairs), statistics.median(b / s for s, b in pairs), own))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n", type=int, default=1500, help="checks per round and size")
    ap.add_argument("--quick", action="store_true", help="scale_bench's --quick size as 'large'")
    args = ap.parse_args()
    large = sb.QUICK if args.quick else sb.LARGE
    rows = asyncio.run(measure(args.rounds, args.n, large))
    print(f"small: {sb.SMALL.engineers} engineers, {sb.SMALL.services} services; large: {large.engineers:,} "
          f"engineers, {large.services:,} services; {args.rounds} rounds of {args.n} per size")
    print("| piece | small p50 (ns) | large p50 (ns) | large - small (ns) | large / small | the piece's own growth (ns) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s, b, d, r, own in rows:
        print(f"| {name} | {s:.0f} | {b:.0f} | {d:+.0f} | {r:.2f}x | {'-' if name == PIECES[0] else f'{own:+.0f}'} |")


if __name__ == "__main__":
    main()
