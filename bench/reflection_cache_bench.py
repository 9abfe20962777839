"""How much the reflection cache costs on the hot path, as ratios against baselines in the same run.

    python bench/reflection_cache_bench.py [--iterations 20000]

- warm hit: ``await cache.get(service)`` on a fresh entry, against awaiting a coroutine that
  only looks the service up in a dict (the least any in-memory ModeSource can do);
- stale serve: a get answered from a stale entry (a background refresh is started once);
- cold fetch: ``cache.get`` after ``invalidate`` (a real reflection round trip to a local demo
  server), against one gRPC health Check to the same server over the same kind of channel.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from devstack.demo_services import LEDGER, start_demo_server  # noqa: E402
from reflection_cache.cache import CacheSettings, ReflectionCache  # noqa: E402
from reflection_cache.endpoints import EndpointResolver  # noqa: E402


async def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def summary(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def main(iterations: int) -> None:
    demo = start_demo_server(services=("ledger",))
    cache = ReflectionCache(EndpointResolver(default=demo.address), CacheSettings(deadline=2))
    try:
        table = {LEDGER: await cache.get(LEDGER)}

        async def dict_lookup():
            return table[LEDGER]

        async def hit():
            return await cache.get(LEDGER)

        rows = [("baseline: dict lookup", await timed(dict_lookup, iterations)),
                ("warm hit", await timed(hit, iterations))]

        clock = [0.0]
        stale = ReflectionCache(EndpointResolver(default=demo.address),
                                CacheSettings(ttl=1, stale_window=1e9, error_backoff=1e9, deadline=2),
                                clock=lambda: clock[0])
        await stale.get(LEDGER)
        clock[0] = 10.0
        rows.append(("stale serve", await timed(lambda: stale.get(LEDGER), iterations)))
        await stale.close()

        channel = grpc.aio.insecure_channel(demo.address)
        health = health_pb2_grpc.HealthStub(channel)
        n = max(iterations // 100, 50)
        rows.append(("baseline: one gRPC health Check", await timed(
            lambda: health.Check(health_pb2.HealthCheckRequest(service=LEDGER)), n)))

        async def cold():
            cache.invalidate(LEDGER)
            return await cache.get(LEDGER)

        rows.append(("cold fetch (reflection)", await timed(cold, n)))
        await channel.close()
    finally:
        await cache.close()
        demo.stop(grace=0)

    base_mem = summary(rows[0][1])[0]
    base_rpc = summary(rows[3][1])[0]
    print(f"{'case':<34}{'p50 µs':>10}{'p99 µs':>10}{'p50 ratio':>12}")
    for i, (name, samples) in enumerate(rows):
        p50, p99 = summary(samples)
        base = base_mem if i < 3 else base_rpc
        print(f"{name:<34}{p50 * 1e6:>10.1f}{p99 * 1e6:>10.1f}{p50 / base:>11.2f}x")
    print("ratios: rows 1-3 against the dict lookup, rows 4-5 against the health Check")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    asyncio.run(main(parser.parse_args().iterations))
