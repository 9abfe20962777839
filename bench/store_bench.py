"""How much the store costs a decision, as ratios against a baseline measured in the same run.

Baseline: the cheapest possible round trip to the same database (``SELECT 1`` on the
same kind of connection). Measured: the calls the gateway makes per request
(``find_requests`` for a principal's approvals, ``update_request`` spending a use,
``get_or_create_pending`` hitting an existing request) and ``GrantCache.current()``.

    python bench/store_bench.py --store sqlite:///tmp/bench.db
    python bench/store_bench.py --store postgresql://postgres@127.0.0.1:5432/benchdb

The PostgreSQL database must exist and should be a scratch one: the bench writes to it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy import Grant, GrantSet, Mode, RequestState, Role, Target, approve, open_request, use  # noqa: E402
from policy.grant_cache import GrantCache  # noqa: E402
from policy.stores import open_store, redact_url  # noqa: E402


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(p50, p99) in microseconds over ``n`` calls, after a short warm-up."""
    for _ in range(min(50, n)):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()

    store = open_store(args.store)
    now = datetime.now(UTC)
    grants = [Grant(f"user{i}@example.com", Role.ENGINEER) for i in range(2000)]
    grants += [Grant(f"user{i}@example.com", Role.CONTRIBUTOR, f"svc{i % 500}.v1.Svc")
               for i in range(2000)]
    store.replace_grants("bench", [Grant(g.principal, g.role, g.service, source="bench") for g in grants])
    gs = GrantSet(store.list_grants())
    target = Target("svc1.v1.Svc", "Do")
    for i in range(300):  # other people's history in the table
        store.create_request(open_request(
            request_id=uuid.uuid4().hex, requester=f"user{i}@example.com", target=target,
            mode=Mode.ENGINEERS_WITH_APPROVAL, grants=gs, now=now), actor="bench")
    me = "user1999@example.com"
    r = store.create_request(open_request(
        request_id=uuid.uuid4().hex, requester=me, target=target, mode=Mode.ENGINEERS_WITH_APPROVAL,
        grants=gs, now=now, approval_ttl=timedelta(days=1)), actor="bench")
    store.update_request(r.id, lambda x: approve(x, "user1@example.com", gs, now), actor="bench",
                         kind="request.approved")
    pending = open_request(request_id=uuid.uuid4().hex, requester=me, target=Target("svc2.v1.Svc", "Do"),
                           mode=Mode.ENGINEERS_WITH_APPROVAL, grants=gs, now=now)
    store.get_or_create_pending(pending, actor="bench")

    def baseline() -> None:
        with store._tx(write=False) as cur:  # noqa: SLF001 - the same connection path, doing nothing
            cur.execute("SELECT 1").fetchone()

    cache = GrantCache(store, reload_interval=60, max_staleness=120).start()
    rows = [
        ("baseline: SELECT 1", baseline),
        ("GrantCache.current().is_engineer", lambda: cache.current().is_engineer(me, now)),
        ("find_requests (requester, target)", lambda: store.find_requests(
            requester=me, service=target.service, method=target.method,
            states=[RequestState.PENDING, RequestState.APPROVED], limit=20)),
        ("get_or_create_pending (exists)", lambda: store.get_or_create_pending(pending, actor="bench")),
        ("update_request(use)", lambda: store.update_request(r.id, lambda x: use(x, now),
                                                             actor="bench", kind="request.used")),
        ("list_grants (4000 grants)", store.list_grants),
    ]
    results = [(name, *timed(fn, args.n if "list_grants" not in name else max(20, args.n // 50)))
               for name, fn in rows]
    cache.close()
    store.close()

    base50, base99 = results[0][1], results[0][2]
    print(f"store: {redact_url(args.store)}   n={args.n}")
    print(f"{'operation':40} {'p50 us':>10} {'p99 us':>10} {'p50/base':>9} {'p99/base':>9}")
    for name, p50, p99 in results:
        print(f"{name:40} {p50:10.1f} {p99:10.1f} {p50 / base50:9.2f} {p99 / base99:9.2f}")


if __name__ == "__main__":
    main()
