"""The fast path's warm-up at start (``fastpath.publisher.static_services`` + ``warm_modes``):
the services behind static reflection endpoints, package prefixes included, are learnt
through each endpoint's own reflection list (the demo server's real reflection)."""
from __future__ import annotations

import asyncio

import pytest

from devstack.demo_services import start_demo_server
from fastpath.publisher import static_services, warm_modes
from policy import Mode
from reflection_cache.cache import CacheSettings, ReflectionCache
from reflection_cache.endpoints import EndpointResolver

ACCOUNTS, LEDGER = "rpcauthz.demo.v1.Accounts", "rpcauthz.demo.v1.Ledger"


@pytest.fixture
def demo():
    server = start_demo_server(reflection=("v1alpha",))
    try:
        yield server
    finally:
        server.stop(grace=0)


async def test_a_package_prefix_warms_every_service_its_endpoint_lists(demo) -> None:
    static = {"rpcauthz.demo": demo.address}
    cache = ReflectionCache(EndpointResolver(static), CacheSettings(deadline=2.0))
    try:
        services = await static_services(cache.services_at, static, deadline_s=5)
        # The endpoint's reflection and health services resolve nowhere under this map: left out.
        assert services == {ACCOUNTS, LEDGER}
        assert await warm_modes(cache.get, sorted(services), deadline_s=5) == (2, 0)
        known = cache.known()
        assert known[ACCOUNTS].methods["ListAccounts"] is Mode.ENGINEERS_WITHOUT_APPROVAL
        assert known[LEDGER].service_default is Mode.CONTRIBUTORS_WITH_APPROVAL
    finally:
        await cache.close()


async def test_a_service_the_map_sends_elsewhere_is_not_taken_from_this_endpoints_list(demo, port) -> None:
    """The map decides which endpoint speaks for a service: Ledger, listed by the demo server
    but mapped to an endpoint that cannot list (nothing listens there), is asked there, by
    its key; the unreachable endpoint is reported and does not hold the others back."""
    elsewhere = f"127.0.0.1:{port}"
    static = {"rpcauthz.demo": demo.address, LEDGER: elsewhere}
    cache = ReflectionCache(EndpointResolver(static), CacheSettings(deadline=1.0))
    try:
        assert await static_services(cache.services_at, static, deadline_s=5) == {ACCOUNTS, LEDGER}
        assert await warm_modes(cache.get, [ACCOUNTS, LEDGER], deadline_s=5) == (1, 1)
        assert set(cache.known()) == {ACCOUNTS}
    finally:
        await cache.close()


async def test_an_endpoint_that_does_not_list_in_time_falls_back_to_its_keys() -> None:
    async def never(endpoint: str) -> list[str]:
        await asyncio.sleep(60)
        return []

    assert await static_services(never, {"a.v1.A": "h:1", "b": "h:1"}, deadline_s=0.05) == {"a.v1.A", "b"}
    assert await static_services(never, {}, deadline_s=0.05) == set()
