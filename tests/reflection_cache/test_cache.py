"""ReflectionCache against real reflection servers: single-flight, TTL, stale-while-revalidate,
negative entries, error backoff, size bound, deadlines. Time is a fake clock the test moves;
the servers and the network are real."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2

from extauthz.target import BadPath, parse_path
from policy import Mode, Target
from reflection_cache import ReflectionUnavailable, UnknownService
from reflection_cache.cache import CacheSettings, ReflectionCache
from reflection_cache.endpoints import EndpointResolver
from reflection_cache.types import ServiceModes
from rpcauthz.v1 import options_pb2
from tests.support.reflection_servers import compile_proto, reflection_server

ORDERS = "shop.orders.v1.Orders"
ORDERS_ADMIN = "shop.orders.v1.OrdersAdmin"
SETTINGS = CacheSettings(ttl=60, stale_window=30, negative_ttl=5, error_backoff=1, deadline=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server():
    with reflection_server(compile_proto("shop/orders/v1/orders.proto"), [ORDERS, ORDERS_ADMIN]) as srv:
        yield srv


@pytest.fixture
async def make_cache(clock):
    caches = []

    def make(address: str, settings: CacheSettings = SETTINGS, **resolver) -> ReflectionCache:
        cache = ReflectionCache(EndpointResolver(resolver.get("static"), default=address), settings,
                                clock=clock)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


def set_get_order_mode(mode: Mode):
    """A rewrite for the test server: GetOrder now declares ``mode`` (a redeployed service)."""
    def rewrite(blob: bytes) -> bytes:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
        for svc in fdp.service:
            for m in svc.method:
                if m.name == "GetOrder":
                    m.options.Extensions[options_pb2.humans_who_can_rpc] = int(mode)
        return fdp.SerializeToString()
    return rewrite


async def wait_idle(cache: ReflectionCache) -> None:
    for _ in range(500):
        if cache.stats()["inflight"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("background refresh never finished")


async def test_hundred_concurrent_misses_make_one_reflection_call(server, make_cache):
    cache = make_cache(server.address)
    results = await asyncio.gather(*(cache.get(ORDERS) for _ in range(100)))
    assert server.servicer.symbol_questions[ORDERS] == 1
    assert server.streams == 1
    assert all(r is results[0] for r in results)
    assert results[0].methods["GetOrder"] is Mode.ENGINEERS_WITHOUT_APPROVAL
    stats = cache.stats()
    assert (stats["fetches"], stats["misses"]) == (1, 100)


async def test_concurrent_misses_share_one_failure_too(server, make_cache):
    server.servicer.abort = grpc.StatusCode.UNAVAILABLE
    cache = make_cache(server.address)
    results = await asyncio.gather(*(cache.get(ORDERS) for _ in range(50)), return_exceptions=True)
    assert all(isinstance(r, ReflectionUnavailable) for r in results)
    assert server.streams == 1


async def test_fresh_hits_then_refetch_after_ttl_and_window(server, make_cache, clock):
    cache = make_cache(server.address)
    await cache.get(ORDERS)
    clock.advance(59)
    await cache.get(ORDERS)
    assert server.streams == 1 and cache.stats()["hits"] == 1
    server.servicer.rewrite = set_get_order_mode(Mode.BREAK_GLASS_ONLY)
    clock.advance(60 + 30)  # past ttl and the stale window: the caller waits for a fresh answer
    modes = await cache.get(ORDERS)
    assert server.streams == 2
    assert modes.methods["GetOrder"] is Mode.BREAK_GLASS_ONLY
    assert cache.stats()["stale_serves"] == 0


async def test_stale_while_revalidate_serves_stale_during_one_refresh_then_the_new_answer(
        server, make_cache, clock):
    cache = make_cache(server.address)
    old = await cache.get(ORDERS)
    server.servicer.gate.clear()  # answers now wait: the refresh stays in flight
    server.servicer.rewrite = set_get_order_mode(Mode.CONTRIBUTORS_WITH_APPROVAL)
    clock.advance(61)
    stale = await asyncio.wait_for(asyncio.gather(*(cache.get(ORDERS) for _ in range(20))), timeout=5)
    assert all(s is old for s in stale)
    assert cache.stats()["stale_serves"] == 20
    assert cache.stats()["inflight"] == 1 and cache.stats()["background_refreshes"] == 1
    server.servicer.gate.set()
    await wait_idle(cache)
    assert server.streams == 2  # one refresh for twenty stale serves
    fresh = await cache.get(ORDERS)
    assert fresh.methods["GetOrder"] is Mode.CONTRIBUTORS_WITH_APPROVAL
    assert cache.stats()["hits"] == 1


async def test_failed_refresh_keeps_stale_within_window_then_raises_then_recovers(
        server, make_cache, clock):
    cache = make_cache(server.address)
    old = await cache.get(ORDERS)
    server.servicer.abort = grpc.StatusCode.UNAVAILABLE
    clock.advance(61)
    assert await cache.get(ORDERS) is old  # stale, refresh starts and fails
    await wait_idle(cache)
    assert server.streams == 2 and cache.stats()["errors"] == 1
    assert await cache.get(ORDERS) is old  # still in the window; no new refresh within the backoff
    await wait_idle(cache)
    assert server.streams == 2 and cache.stats()["background_refreshes"] == 1
    clock.advance(1)  # backoff over: the next stale serve triggers one more refresh
    assert await cache.get(ORDERS) is old
    await wait_idle(cache)
    assert server.streams == 3
    clock.advance(30)  # the stale window is over: the error reaches the caller, no mode is invented
    with pytest.raises(ReflectionUnavailable):
        await cache.get(ORDERS)
    server.servicer.abort = None
    clock.advance(1)  # past the short error backoff
    assert (await cache.get(ORDERS)).methods["GetOrder"] is Mode.ENGINEERS_WITHOUT_APPROVAL


async def test_transient_errors_are_remembered_only_for_the_backoff(server, make_cache, clock):
    cache = make_cache(server.address)
    server.servicer.abort = grpc.StatusCode.INTERNAL
    with pytest.raises(ReflectionUnavailable):
        await cache.get(ORDERS)
    server.servicer.abort = None
    with pytest.raises(ReflectionUnavailable):  # within the backoff: not asked again
        await cache.get(ORDERS)
    assert server.streams == 1
    clock.advance(1)
    assert (await cache.get(ORDERS)).service == ORDERS
    assert server.streams == 2


async def test_unknown_service_is_a_short_lived_negative_entry(server, make_cache, clock):
    cache = make_cache(server.address)
    missing = "shop.orders.v1.Gone"
    for _ in range(3):
        with pytest.raises(UnknownService, match=missing):
            await cache.get(missing)
    assert server.servicer.symbol_questions[missing] == 1
    assert cache.stats()["negative_hits"] == 2
    clock.advance(5)
    with pytest.raises(UnknownService):
        await cache.get(missing)
    assert server.servicer.symbol_questions[missing] == 2


async def test_size_bound_evicts_least_recently_used(server, make_cache):
    cache = make_cache(server.address, CacheSettings(max_entries=2, deadline=2))
    await cache.get(ORDERS)
    await cache.get(ORDERS_ADMIN)
    await cache.get(ORDERS)          # ORDERS is now the most recently used
    missing = "shop.orders.v1.Gone"
    with pytest.raises(UnknownService):
        await cache.get(missing)     # a third entry pushes out ORDERS_ADMIN
    assert cache.stats()["entries"] == 2 and cache.stats()["evictions"] == 1
    assert ORDERS in cache and ORDERS_ADMIN not in cache
    await cache.get(ORDERS_ADMIN)
    assert server.servicer.symbol_questions[ORDERS_ADMIN] == 2


async def test_an_entry_used_since_it_was_stored_outlives_older_unused_ones(server, make_cache):
    """Second chance: a hit (also through ``get_fresh``, the server's fast path) only marks
    its entry; when the bound is reached the oldest unmarked entry goes, and a marked one
    is kept once with its mark cleared."""
    cache = make_cache(server.address, CacheSettings(max_entries=2, deadline=2))
    await cache.get(ORDERS)
    await cache.get(ORDERS_ADMIN)
    assert cache.get_fresh(ORDERS) is not None      # ORDERS, the oldest, is used again
    for gone in ("shop.orders.v1.Gone1", "shop.orders.v1.Gone2"):
        with pytest.raises(UnknownService):
            await cache.get(gone)
    # Gone1 pushed out ORDERS_ADMIN (ORDERS was passed over); Gone2 pushed out ORDERS,
    # which was not used again after that.
    assert ORDERS_ADMIN not in cache and ORDERS not in cache
    assert cache.stats()["entries"] == 2 and cache.stats()["evictions"] == 2
    await cache.get(ORDERS)
    assert server.servicer.symbol_questions[ORDERS] == 2


async def test_invalidate_forces_a_fetch(server, make_cache):
    cache = make_cache(server.address)
    await cache.get(ORDERS)
    assert cache.invalidate(ORDERS) is True
    assert cache.invalidate(ORDERS) is False
    await cache.get(ORDERS)
    assert server.servicer.symbol_questions[ORDERS] == 2


async def test_slow_reflection_fails_at_the_cache_deadline(make_cache):
    with reflection_server(compile_proto("shop/orders/v1/orders.proto"), [ORDERS], delay=10) as slow:
        cache = make_cache(slow.address, CacheSettings(deadline=0.3))
        start = time.monotonic()
        results = await asyncio.gather(*(cache.get(ORDERS) for _ in range(10)), return_exceptions=True)
        assert time.monotonic() - start < 3
    assert all(isinstance(r, ReflectionUnavailable) and "deadline" in str(r) for r in results)


async def test_a_caller_giving_up_does_not_cancel_the_shared_fetch(server, make_cache):
    cache = make_cache(server.address)
    server.servicer.gate.clear()
    impatient = asyncio.ensure_future(cache.get(ORDERS))
    patient = asyncio.ensure_future(cache.get(ORDERS))
    await asyncio.sleep(0.05)
    impatient.cancel()
    server.servicer.gate.set()
    assert (await asyncio.wait_for(patient, 5)).service == ORDERS
    assert server.streams == 1


async def test_services_are_routed_by_the_resolver_and_share_a_channel_per_endpoint(server, make_cache, port):
    cache = make_cache(f"127.0.0.1:{port}", static={"shop.orders": server.address})
    await cache.get(ORDERS)
    await cache.get(ORDERS_ADMIN)
    assert len(cache.client.channels) == 1
    with pytest.raises(ReflectionUnavailable):  # default endpoint: nothing listens there
        await cache.get("other.v1.Thing")
    with pytest.raises(UnknownService, match="not a fully-qualified"):
        await cache.get("/shop.orders.v1.Orders/GetOrder")


async def test_no_endpoint_configured_is_unknown_service(make_cache, clock):
    cache = ReflectionCache(EndpointResolver(static={"shop": "127.0.0.1:1"}), SETTINGS, clock=clock)
    try:
        with pytest.raises(UnknownService, match="no reflection endpoint is configured for service pay.v1.Pay"):
            await cache.get("pay.v1.Pay")
    finally:
        await cache.close()


@pytest.mark.parametrize("bad", [dict(ttl=0), dict(deadline=-1), dict(stale_window=-1),
                                 dict(negative_ttl=-0.1), dict(max_entries=0),
                                 dict(channel_idle_timeout=0)])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CacheSettings(**bad)


def test_settings_from_a_config_mapping():
    assert CacheSettings.from_mapping({"ttl": 30, "deadline": 0.25, "max_entries": 10}) == \
        CacheSettings(ttl=30.0, deadline=0.25, max_entries=10)
    with pytest.raises(ValueError, match="tll: unknown key"):
        CacheSettings.from_mapping({"tll": 30})
    with pytest.raises(ValueError, match="ttl: Input should be a valid number"):
        CacheSettings.from_mapping({"ttl": "30s"})
    with pytest.raises(ValueError, match="max_entries: Input should be a valid integer"):
        CacheSettings.from_mapping({"max_entries": 1.5})


async def test_channel_idle_timeout_from_config_reaches_the_channel_pool(server):
    """``cache.channel_idle_timeout`` (seconds, or null to keep channels) is what the pool
    closes idle reflection channels after; the default is 0.5 s."""
    for given, expected in (({}, 0.5), ({"channel_idle_timeout": 3}, 3.0),
                            ({"channel_idle_timeout": None}, None)):
        cache = ReflectionCache.from_config({"endpoints": {"default": server.address}, "cache": given})
        try:
            assert cache.client.channels.idle_timeout == expected
        finally:
            await cache.close()
    plain = ReflectionCache(EndpointResolver(default=server.address), CacheSettings(channel_idle_timeout=2))
    try:
        assert plain.client.channels.idle_timeout == 2
    finally:
        await plain.close()


async def test_cache_from_a_config_mapping(server):
    cache = ReflectionCache.from_config({"endpoints": {"static": {"shop": server.address}},
                                         "cache": {"ttl": 5, "deadline": 1}})
    try:
        assert cache.settings == CacheSettings(ttl=5, deadline=1)
        assert (await cache.get(ORDERS)).service == ORDERS
    finally:
        await cache.close()
    with pytest.raises(ValueError, match="endpoint: unknown key"):
        ReflectionCache.from_config({"endpoint": {}})
    with pytest.raises(ValueError, match="cache.ttl_seconds: unknown key"):
        ReflectionCache.from_config({"cache": {"ttl_seconds": 1}})


async def test_known_lists_what_get_would_answer_and_refresh_stale_refreshes_it(server, make_cache, clock):
    """For the fast path: ``known()`` is what ``get`` answers without waiting (fresh or still
    served stale; no remembered errors), and ``refresh_stale()`` refreshes entries past their TTL
    that no call reaches any more (Envoy answers them), so a mode change is still seen."""
    cache = make_cache(server.address, static={"nope.v1.Missing": "127.0.0.1:1"})
    await cache.get(ORDERS)
    with pytest.raises(ReflectionUnavailable):
        await cache.get("nope.v1.Missing")
    assert set(cache.known()) == {ORDERS}
    assert cache.refresh_stale() == 0  # fresh: nothing to do
    server.servicer.rewrite = set_get_order_mode(Mode.BREAK_GLASS_ONLY)
    clock.advance(61)  # stale, still served
    assert set(cache.known()) == {ORDERS}
    assert cache.refresh_stale() == 1 and cache.refresh_stale() == 0  # one refresh in flight
    await wait_idle(cache)
    assert cache.known()[ORDERS].methods["GetOrder"] is Mode.BREAK_GLASS_ONLY
    clock.advance(60 + 30)  # past the stale window: not known (get would have to wait)
    assert cache.known() == {}


def path_answers(cache: ReflectionCache, service: str, methods: list[str],
                 default: Mode = Mode.BREAK_GLASS_ONLY) -> dict[str, tuple[Mode, str] | None]:
    return {m: cache.fresh_mode(f"/{service}/{m}", default) for m in methods}


async def test_fresh_mode_by_path_answers_as_mode_for_and_only_while_fresh(server, make_cache, clock):
    """The warm path's index gives exactly ``get`` + ``mode_for``'s answers, for fresh
    entries only; anything else is None ("ask get()"), and nothing is fetched by it."""
    cache = make_cache(server.address)
    methods = {ORDERS: ["GetOrder", "Refund", "ListOrders"], ORDERS_ADMIN: ["Purge", "Stats"]}
    assert path_answers(cache, ORDERS, methods[ORDERS]) == dict.fromkeys(methods[ORDERS])
    assert cache.stats()["fetches"] == 0 and cache.stats()["inflight"] == 0
    for service, names in methods.items():
        modes = await cache.get(service)
        for default in (Mode.BREAK_GLASS_ONLY, Mode.ENGINEERS_WITH_APPROVAL):
            assert path_answers(cache, service, names, default) == {
                m: modes.mode_for(m, default) for m in names}
    # Stats declares nothing and OrdersAdmin has no default: the caller's default applies
    assert cache.fresh_mode(f"/{ORDERS_ADMIN}/Stats", Mode.ENGINEERS_WITH_APPROVAL) == (
        Mode.ENGINEERS_WITH_APPROVAL, "default")
    assert cache.fresh_mode(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) == (
        Mode.ENGINEERS_WITHOUT_APPROVAL, "method")
    assert cache.fresh_mode(f"/{ORDERS}/ListOrders", Mode.BREAK_GLASS_ONLY) == (
        Mode.CONTRIBUTORS_WITHOUT_APPROVAL, "service")
    for unknown in (f"/{ORDERS}/NoSuch", "/shop.orders.v1.Gone/GetOrder", f"/{ORDERS}/getorder",
                    f"{ORDERS}/GetOrder", f"/{ORDERS}/GetOrder/", ORDERS):
        assert cache.fresh_mode(unknown, Mode.BREAK_GLASS_ONLY) is None
    hits = cache.stats()["hits"]
    clock.advance(59.9)
    assert cache.fresh_mode(f"/{ORDERS}/Refund", Mode.ENGINEERS_WITH_APPROVAL) == (Mode.BREAK_GLASS_ONLY, "method")
    assert cache.stats()["hits"] == hits + 1
    clock.advance(0.1)  # fresh_until reached: stale from here, as get() sees it
    assert path_answers(cache, ORDERS, methods[ORDERS]) == dict.fromkeys(methods[ORDERS])
    assert path_answers(cache, ORDERS_ADMIN, methods[ORDERS_ADMIN]) == dict.fromkeys(methods[ORDERS_ADMIN])
    assert cache.stats()["background_refreshes"] == 0  # fresh_mode never starts a fetch
    # get() serves stale and refreshes; the refreshed entry is indexed again, with the new mode
    server.servicer.rewrite = set_get_order_mode(Mode.CONTRIBUTORS_WITH_APPROVAL)
    await cache.get(ORDERS)
    await wait_idle(cache)
    assert cache.fresh_mode(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) == (
        Mode.CONTRIBUTORS_WITH_APPROVAL, "method")
    assert cache.fresh_mode(f"/{ORDERS_ADMIN}/Purge", Mode.BREAK_GLASS_ONLY) is None  # still stale


async def test_fresh_target_is_parse_path_and_mode_for_in_one_lookup(server, make_cache, clock):
    """``fresh_target`` answers the pipeline's parse_path + fresh mode: the same ``Target``
    (equal, of the same type) and the same (mode, source), None exactly where
    ``fresh_mode`` is None."""
    cache = make_cache(server.address)
    names = {ORDERS: ["GetOrder", "Refund", "ListOrders"], ORDERS_ADMIN: ["Purge", "Stats"]}
    for service, methods in names.items():
        modes = await cache.get(service)
        for m in methods:
            path = "".join(["/", service, "/", m])  # a fresh string, as a request's
            for default in (Mode.BREAK_GLASS_ONLY, Mode.ENGINEERS_WITH_APPROVAL):
                target, answer = cache.fresh_target(path, default)
                assert type(target) is Target and target == parse_path(path)
                assert hash(target) == hash(Target(service, m)) and str(target) == path
                assert answer == modes.mode_for(m, default) == cache.fresh_mode(path, default)
    for unknown in (f"/{ORDERS}/NoSuch", f"{ORDERS}/GetOrder", f"/{ORDERS}/GetOrder/", ORDERS, ""):
        assert cache.fresh_target(unknown, Mode.BREAK_GLASS_ONLY) is None
    clock.advance(60)
    assert cache.fresh_target(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) is None


async def test_fresh_target_leaves_names_parse_path_refuses_to_the_full_path():
    """Reflection can answer any names: only paths parse_path accepts as they are get into
    the index (a name ending in a newline included)."""
    odd = {"Get\n": None, "Fine": Mode.ENGINEERS_WITHOUT_APPROVAL, "9lives": None}

    class Stub:
        async def fetch(self, service: str, endpoint: str, *, deadline: float | None = None) -> ServiceModes:
            return ServiceModes(service, odd, service_default=Mode.ENGINEERS_WITH_APPROVAL)

        async def close(self) -> None:
            pass

    class AnyName:  # the configured resolver refuses such service names; the index must too
        def resolve(self, service: str) -> str:
            return "127.0.0.1:1"

    cache = ReflectionCache(AnyName(), SETTINGS, client=Stub())  # type: ignore[arg-type]
    for service in ("odd.v1.Svc", "odd.v1.Svc\n"):
        await cache.get(service)
        for method in odd:
            path = f"/{service}/{method}"
            try:
                parse_path(path)
            except BadPath:
                assert cache.fresh_target(path, Mode.BREAK_GLASS_ONLY) is None, path
            else:
                assert cache.fresh_target(path, Mode.BREAK_GLASS_ONLY) is not None, path
    assert cache.fresh_target("/odd.v1.Svc/Fine", Mode.BREAK_GLASS_ONLY) == (
        Target("odd.v1.Svc", "Fine"), (Mode.ENGINEERS_WITHOUT_APPROVAL, "method"))
    await cache.close()


async def test_fresh_mode_forgets_replaced_invalidated_and_failed_entries(server, make_cache, clock):
    cache = make_cache(server.address)
    await cache.get(ORDERS)
    await cache.get(ORDERS_ADMIN)
    get_order = f"/{ORDERS}/GetOrder"
    assert cache.fresh_mode(get_order, Mode.BREAK_GLASS_ONLY) is not None
    assert cache.invalidate(ORDERS)
    assert cache.fresh_mode(get_order, Mode.BREAK_GLASS_ONLY) is None
    assert cache.fresh_mode(f"/{ORDERS_ADMIN}/Purge", Mode.BREAK_GLASS_ONLY) is not None
    # a redeploy seen by a fetch replaces the entry: the old answer is gone with it
    server.servicer.rewrite = set_get_order_mode(Mode.BREAK_GLASS_ONLY)
    await cache.get(ORDERS)
    assert cache.fresh_mode(get_order, Mode.ENGINEERS_WITH_APPROVAL) == (Mode.BREAK_GLASS_ONLY, "method")
    cache.invalidate_all()
    assert cache.fresh_mode(get_order, Mode.BREAK_GLASS_ONLY) is None
    assert cache.fresh_mode(f"/{ORDERS_ADMIN}/Purge", Mode.BREAK_GLASS_ONLY) is None
    # past ttl and stale window, a failed fetch leaves a remembered error: never an answer
    await cache.get(ORDERS)
    clock.advance(91)
    server.servicer.abort = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ReflectionUnavailable):
        await cache.get(ORDERS)
    assert cache.fresh_mode(get_order, Mode.BREAK_GLASS_ONLY) is None
    server.servicer.abort = None
    clock.advance(1)
    await cache.get(ORDERS)
    assert cache.fresh_mode(get_order, Mode.ENGINEERS_WITH_APPROVAL) == (Mode.BREAK_GLASS_ONLY, "method")


async def test_fresh_mode_steps_aside_when_the_cache_is_over_half_full(server, make_cache):
    """Hits through the index do not mark entries for second-chance eviction, so past half
    of max_entries it answers None and every hit goes through get()/get_fresh, which mark."""
    cache = make_cache(server.address, CacheSettings(max_entries=3, deadline=2))
    await cache.get(ORDERS)
    assert cache.fresh_mode(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) is not None
    await cache.get(ORDERS_ADMIN)  # 2 of 3
    assert cache.fresh_mode(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) is None
    assert cache.fresh_mode(f"/{ORDERS_ADMIN}/Purge", Mode.BREAK_GLASS_ONLY) is None
    assert cache.get_fresh(ORDERS) is not None
    cache.invalidate(ORDERS_ADMIN)  # 1 of 3 again: entries stored from now on are indexed
    cache.invalidate(ORDERS)
    await cache.get(ORDERS)
    assert cache.fresh_mode(f"/{ORDERS}/GetOrder", Mode.BREAK_GLASS_ONLY) is not None
