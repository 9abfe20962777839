"""gRPC health reflects whether this replica can decide (issue 9, finding 3): NOT_SERVING while
the store has been lost (down or hung) for health.store_lost_after_s or the grants are stale,
SERVING again when it recovers, and never SERVING again once a drain began."""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import free_port
from extauthz.config import load_settings
from extauthz.server import AUTHZ_SERVICE, Components, serve
from policy import Grant, GrantSet, Mode, Role, StoreError
from policy.stores import open_store
from reflection_cache.types import ServiceModes
from tests.support.extauthz_doubles import FixedGrants, StaticModes
from tests.support.gateway_harness import ACCOUNTS

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class SwitchableStore:
    """The real SQLite store, which can be made to fail (``down``) or hang (``hung``)."""

    def __init__(self) -> None:
        self._store = open_store("sqlite:///:memory:")
        self.down = False
        self.hung = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str):
        real = getattr(self._store, name)
        if not callable(real) or name == "close":
            return real

        def call(*args, **kwargs):
            if self.hung.is_set():
                self.release.wait(30)
            if self.down:
                raise StoreError(f"store is down ({name}: connection refused)")
            return real(*args, **kwargs)
        return call


class StaleableGrants(FixedGrants):
    stale = False

    def current(self) -> GrantSet:
        if self.stale:
            raise StoreError("grants are 130s old, past the 120s max staleness")
        return super().current()


async def _status(stub, service: str = AUTHZ_SERVICE) -> int:
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


async def _wait_for(stub, want: int, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await _status(stub) == want and await _status(stub, "") == want:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"health not {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} within {within}s")


async def _serving(store, grants, **overrides):
    port, metrics_port = free_port(), free_port()
    settings = load_settings(env={}, overrides={"store_url": "memory:", "listen.port": port,
                                                "metrics.port": metrics_port, "drain_grace_s": 1, "drain_notice_s": 0,
                                                "health.interval_s": 0.1, "health.store_timeout_s": 0.3,
                                                "health.store_lost_after_s": 1.0, **overrides})
    modes = StaticModes({ACCOUNTS: ServiceModes(ACCOUNTS, {"ListAccounts": Mode.ENGINEERS_WITHOUT_APPROVAL})})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, components=Components(store, grants, modes), stop=stop,
                                     install_signal_handlers=False))
    return port, metrics_port, stop, task


def _gauge(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return [ln for ln in r.read().decode().splitlines() if ln.startswith("rpcauthz_serving")][0]


async def test_store_down_then_back_turns_health_not_serving_then_serving():
    store = SwitchableStore()
    grants = FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)]))
    port, metrics_port, stop, task = await _serving(store, grants)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await _wait_for(stub, SERVING, 10)
            assert _gauge(metrics_port).endswith(" 1.0")
            store.down = True
            took = await _wait_for(stub, NOT_SERVING, 10)
            assert took >= 0.8, "one failed probe must not be enough"  # store_lost_after_s = 1
            assert _gauge(metrics_port).endswith(" 0.0")
            store.down = False
            await _wait_for(stub, SERVING, 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_hung_store_turns_health_not_serving():
    store = SwitchableStore()
    grants = FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)]))
    port, _m, stop, task = await _serving(store, grants)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await _wait_for(stub, SERVING, 10)
            store.hung.set()
            await _wait_for(stub, NOT_SERVING, 10)
            store.hung.clear()
            store.release.set()
            await _wait_for(stub, SERVING, 10)
    finally:
        store.release.set()
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_stale_grants_turn_health_not_serving_and_a_drain_is_never_revived():
    store = SwitchableStore()
    grants = StaleableGrants(GrantSet([Grant("alice", Role.ENGINEER)]))
    port, _m, stop, task = await _serving(store, grants, drain_notice_s=1.5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await _wait_for(stub, SERVING, 10)
            grants.stale = True
            took = await _wait_for(stub, NOT_SERVING, 10)
            assert took < 5
            grants.stale = False
            await _wait_for(stub, SERVING, 10)
            stop.set()  # drain: NOT_SERVING for the whole notice, although everything is fine
            await _wait_for(stub, NOT_SERVING, 5)
            for _ in range(10):
                await asyncio.sleep(0.1)
                assert await _status(stub) == NOT_SERVING
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
