"""The publisher: what reaches the ADS server when grants or modes change, when a grant is about
to expire, and when the grants cannot be read (withdrawn, never kept)."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from fastpath.compile import content_label, empty_policy, shard_names, shard_of
from fastpath.publisher import Publisher
from fastpath.xds import FastPathXds
from policy import Grant, GrantSet, Mode, Role, StoreError
from policy.grant_delta import GrantChange, GrantDelta
from reflection_cache.types import ServiceModes
from tests.support.fastpath_rbac import shadow_allows

S = "a.v1.S"
PATH = f"/{S}/Get"


class Grants:
    def __init__(self, gs: GrantSet) -> None:
        self.gs: GrantSet | Exception = gs

    def current(self) -> GrantSet:
        if isinstance(self.gs, Exception):
            raise self.gs
        return self.gs


class Modes:
    def __init__(self, mode: Mode) -> None:
        self.modes = {S: ServiceModes(S, {"Get": mode})}
        self.refreshes = 0

    def known(self) -> dict[str, ServiceModes]:
        return dict(self.modes)

    def refresh_stale(self) -> int:
        self.refreshes += 1
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def allows(pub: Publisher, who: str = "alice") -> bool:
    return pub.current is not None and shadow_allows(pub.current.rbac, who, PATH) is not None


@pytest.fixture
async def running():
    started: list[asyncio.Task[None]] = []

    def start(pub: Publisher) -> Publisher:
        started.append(asyncio.get_running_loop().create_task(pub.run()))
        return pub
    yield start
    for t in started:
        t.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def test_grant_and_mode_changes_are_pushed(running) -> None:
    xds = FastPathXds(ttl_s=10)
    grants = Grants(GrantSet([Grant("alice", Role.ENGINEER)], revision=1))
    modes = Modes(Mode.ENGINEERS_WITHOUT_APPROVAL)
    pushes = []
    pub = running(Publisher(xds, grants, modes, default_mode=Mode.BREAK_GLASS_ONLY,
                            horizon=timedelta(seconds=20), debounce_s=0.02, poll_s=0.01,
                            modes_check_s=0.02, on_push=pushes.append))
    await until(lambda: allows(pub))
    # The policy version counts pushes; the part's label names its content.
    assert xds.version == pushes[-1].version == "1"
    assert pub.current.version == content_label(pub.current.content)  # type: ignore[union-attr]

    # A revoked grant (a delta) is recompiled and pushed.
    grants.gs = grants.current().apply(GrantDelta(1, 2, (GrantChange(Grant("alice", Role.ENGINEER), deleted=True),)))
    await until(lambda: not allows(pub))
    assert pushes[-1].lag_s < 1
    # Each push says what it was compiled from (what tests and /metrics wait on).
    assert pushes[-1].source is not None and pushes[-1].source.grants_revision == 2
    assert pushes[-1].source.services == 1 and xds.source == pushes[-1].source

    # A mode changed to an approval mode (after a reflection refresh) leaves the fast path.
    grants.gs = GrantSet([Grant("alice", Role.ENGINEER)], revision=3)
    await until(lambda: allows(pub))
    modes.modes = {S: ServiceModes(S, {"Get": Mode.ENGINEERS_WITH_APPROVAL})}
    await until(lambda: not allows(pub))
    assert modes.refreshes > 0, "entries past their TTL are refreshed by the publisher"


async def test_unreadable_grants_withdraw_then_recover(running) -> None:
    xds = FastPathXds(ttl_s=10)
    grants = Grants(GrantSet([Grant("alice", Role.ENGINEER)], revision=1))
    pub = running(Publisher(xds, grants, Modes(Mode.ENGINEERS_WITHOUT_APPROVAL),
                            default_mode=Mode.BREAK_GLASS_ONLY, horizon=timedelta(seconds=20),
                            debounce_s=0.0, poll_s=0.01, modes_check_s=0.02))
    await until(lambda: allows(pub))
    grants.gs = StoreError("store lost for 120 s")
    await until(lambda: ".empty." in xds.version)
    assert pub.withdrawn and "store lost" in pub.withdrawn
    grants.gs = GrantSet([Grant("alice", Role.ENGINEER)], revision=1)
    await until(lambda: ".empty." not in xds.version and pub.withdrawn is None)


async def test_a_grant_leaves_the_policy_before_it_expires(running) -> None:
    clock = Clock()
    horizon = timedelta(seconds=20)
    expires = clock.now + timedelta(seconds=60)
    grants = Grants(GrantSet([Grant("alice", Role.ENGINEER, expires_at=expires)], revision=1))
    pub = running(Publisher(FastPathXds(ttl_s=10), grants, Modes(Mode.ENGINEERS_WITHOUT_APPROVAL),
                            default_mode=Mode.BREAK_GLASS_ONLY, horizon=horizon, debounce_s=0.0,
                            poll_s=0.01, modes_check_s=0.02, clock=clock))
    await until(lambda: allows(pub))
    assert pub.current is not None and pub.current.recompile_at == expires - horizon
    clock.now = expires - horizon  # nothing changed but time: recompiled without the grant
    await until(lambda: not allows(pub))


async def test_a_failing_mode_source_withdraws_instead_of_dying(running, caplog) -> None:
    class Broken(Modes):
        def known(self) -> dict[str, ServiceModes]:
            raise RuntimeError("boom")

    xds = FastPathXds(ttl_s=10)
    xds.publish("9", shadow_policy_for_alice())
    pub = running(Publisher(xds, Grants(GrantSet([Grant("alice", Role.ENGINEER)])), Broken(Mode.ENGINEERS_WITHOUT_APPROVAL),
                            default_mode=Mode.BREAK_GLASS_ONLY, horizon=timedelta(seconds=20), poll_s=0.01))
    await until(lambda: ".empty." in xds.version)
    assert pub.withdrawn and "boom" in pub.withdrawn
    assert "withdrawing the fast path" in caplog.text


def shadow_policy_for_alice():
    from fastpath.compile import compile_policy
    return compile_policy({S: ServiceModes(S, {"Get": Mode.ENGINEERS_WITHOUT_APPROVAL})},
                          GrantSet([Grant("alice", Role.ENGINEER)]), datetime.now(UTC), version="9",
                          default_mode=Mode.BREAK_GLASS_ONLY).rbac


async def test_sharded_a_grant_change_pushes_the_callers_shard_alone(running) -> None:
    shards = 4
    names = shard_names(shards)
    xds = FastPathXds(ttl_s=10, names=names)
    people = [f"eng{i}" for i in range(40)]
    grants = Grants(GrantSet([Grant(p, Role.ENGINEER) for p in people], revision=1))
    pushes = []
    pub = running(Publisher(xds, grants, Modes(Mode.ENGINEERS_WITHOUT_APPROVAL), default_mode=Mode.BREAK_GLASS_ONLY,
                            horizon=timedelta(seconds=20), debounce_s=0.02, poll_s=0.01, modes_check_s=0.02,
                            shards=shards, on_push=pushes.append))
    await until(lambda: pub.parts is not None)
    assert pub.current is None and pushes[-1].changed_shards == shards
    assert pushes[-1].engineers == len(people) and pushes[-1].changed_bytes == pushes[-1].size_bytes
    first = dict(xds._shards)  # noqa: SLF001

    leaver = people[7]
    grants.gs = grants.current().apply(GrantDelta(1, 2, (GrantChange(Grant(leaver, Role.ENGINEER), deleted=True),)))
    await until(lambda: len(pushes) == 2)
    k = shard_of(leaver, shards)
    assert pushes[-1].changed_shards == 1 and pushes[-1].changed_bytes < pushes[-1].size_bytes / 2
    assert [n for n in names if xds._shards[n] != first[n]] == [names[k]]  # noqa: SLF001
    assert shadow_allows(xds._shards[names[k]][1], leaver, PATH) is None  # noqa: SLF001
    assert xds.source is not None and xds.source.grants_revision == 2


def test_the_server_and_publisher_must_agree_on_the_shards() -> None:
    with pytest.raises(ValueError, match=r"serves \['rpcauthz_fast_path'\], not the 2 shard"):
        Publisher(FastPathXds(ttl_s=10), Grants(GrantSet()), Modes(Mode.ENGINEERS_WITHOUT_APPROVAL),
                  default_mode=Mode.BREAK_GLASS_ONLY, horizon=timedelta(seconds=20), shards=2)
    sharded = FastPathXds(ttl_s=10, names=shard_names(2))
    with pytest.raises(ValueError, match="serves 2 shards: use publish_shards"):
        sharded.publish("1", empty_policy())
    with pytest.raises(ValueError, match="shards must be exactly"):
        sharded.publish_shards("1", {"rpcauthz_fast_path": ("1", empty_policy())})
    with pytest.raises(ValueError, match="distinct and not empty"):
        FastPathXds(ttl_s=10, names=["a", "a"])


async def test_warm_modes_learns_what_it_can_within_its_deadline() -> None:
    """Each service fetched once, 16 at once at most; failures counted, not raised; what the
    deadline cuts off is counted as not learnt."""
    from fastpath.publisher import warm_modes
    fetched: list[str] = []
    at_once = peak = 0

    async def fetch(service: str) -> None:
        nonlocal at_once, peak
        at_once += 1
        peak = max(peak, at_once)
        try:
            fetched.append(service)
            if service.startswith("bad"):
                raise RuntimeError(f"{service}: no reflection")
            await asyncio.sleep(30 if service == "hung" else 0.01)
        finally:
            at_once -= 1
    services = [f"s{i}" for i in range(40)] + ["bad1", "bad2"]
    assert await warm_modes(fetch, services, deadline_s=5) == (40, 2)
    assert sorted(fetched) == sorted(services) and peak == 16
    t0 = asyncio.get_running_loop().time()
    assert await warm_modes(fetch, ["hung", "s1"], deadline_s=0.3) == (1, 1)
    assert asyncio.get_running_loop().time() - t0 < 5


async def test_the_first_policy_waits_for_the_warm_up(running) -> None:
    """``warm`` runs before the first compile: a service it teaches the modes of is in the
    first policy pushed (a restarted server's policy is not narrower than the last one)."""
    xds = FastPathXds(ttl_s=10)
    modes = Modes(Mode.ENGINEERS_WITHOUT_APPROVAL)
    taught, pushes = dict(modes.modes), []
    modes.modes = {}

    async def warm() -> None:
        await asyncio.sleep(0.2)
        modes.modes = taught
    running(Publisher(xds, Grants(GrantSet([Grant("alice", Role.ENGINEER)], revision=1)), modes,
                      default_mode=Mode.BREAK_GLASS_ONLY, horizon=timedelta(seconds=20), debounce_s=0.0,
                      poll_s=0.01, modes_check_s=0.02, on_push=pushes.append, warm=warm))
    await until(lambda: bool(pushes))
    assert pushes[0].source is not None and pushes[0].source.services == 1 and pushes[0].engineers == 1
