"""The ADS server's stream rules with the policy in shards, driven by a scripted client (the
real Envoy's side is tests/fastpath/test_shards_envoy.py): an Envoy that subscribes to its
shards one by one gets each, responses carry only what changed, and a NACK of a response
already superseded still withdraws every shard (Envoy kept that shard's older config, which a
later partial response does not replace)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from fastpath.compile import empty_policy, shard_names
from fastpath.envoy_config import NODE_METADATA_KEY
from fastpath.xds import ECDS_TYPE, FastPathXds, resource_version
from tests.support.xds_envoy import serve_ads

NAMES = shard_names(3)


class Client:
    """One scripted ADS stream."""

    def __init__(self, port: int, node: str = "scripted", claim: str | None = None) -> None:
        """``claim``: the principal claim its node metadata says it was rendered for (None: none)."""
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.node, self.claim = node, claim

        async def send() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await self.requests.get()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(send())

    async def ask(self, names: list[str], *, nonce: str = "", version: str = "", error: str = "") -> None:
        r = discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE, resource_names=names, response_nonce=nonce,
                                           version_info=version)
        r.node.id = self.node
        if self.claim is not None:
            r.node.metadata.fields[NODE_METADATA_KEY].struct_value.fields["principal_claim"].string_value = self.claim
        if error:
            r.error_detail.code, r.error_detail.message = 3, error
        await self.requests.put(r)

    async def response(self, reading: asyncio.Future[Any] | None = None
                       ) -> tuple[discovery_pb2.DiscoveryResponse, dict[str, str]]:
        """The next response (``reading``: a read already under way) and its resources'
        labels (the policy version each was published in) by name, each resource's own
        version checked to be that label and its config's digest."""
        resp = await asyncio.wait_for(reading if reading is not None else self.call.read(), 5)
        versions = {}
        for any_ in resp.resources:
            res = discovery_pb2.Resource()
            any_.Unpack(res)
            versions[res.name] = _label(res)
        return resp, versions


def _label(res: discovery_pb2.Resource) -> str:
    """The label of ``res`` (a resource with its body), checking its version names its config."""
    config = extension_pb2.TypedExtensionConfig()
    res.resource.Unpack(config)
    rbac = http_rbac_pb2.RBAC()
    config.typed_config.Unpack(rbac)
    label = res.version.split("+", 1)[0]
    assert config.name == res.name and res.ttl.seconds == 30 and res.version == resource_version(label, rbac)
    return label


@pytest.fixture
async def served() -> AsyncIterator[tuple[FastPathXds, Client]]:
    """The ADS server (serving ``NAMES``) and one scripted client's stream to it."""
    xds = FastPathXds(ttl_s=30, names=NAMES)
    server, port = await serve_ads(xds)
    c = Client(port)
    try:
        yield xds, c
    finally:
        c.call.cancel()
        await c.channel.close()
        await server.stop(0)


async def test_subscriptions_partial_responses_and_a_superseded_nack(served) -> None:
    xds, c = served
    xds.publish_shards("1", {n: ("1", empty_policy()) for n in NAMES})
    # Envoy subscribes as its filters come up: one name, then all; each is sent once.
    await c.ask(NAMES[:1])
    r1, got = await c.response()
    assert got == {NAMES[0]: "1"} and r1.version_info == "1"
    await c.ask(NAMES, nonce=r1.nonce, version="1")
    r2, got = await c.response()
    assert got == {NAMES[1]: "1", NAMES[2]: "1"}
    await c.ask(NAMES, nonce=r2.nonce, version="1")

    # A publish changing shard 2 sends shard 2; another right after changes shard 0.
    xds.publish_shards("2", {NAMES[0]: ("1", empty_policy()), NAMES[1]: ("1", empty_policy()),
                             NAMES[2]: ("2", empty_policy())})
    r3, got = await c.response()
    assert got == {NAMES[2]: "2"} and r3.version_info == "2"
    xds.publish_shards("3", {NAMES[0]: ("3", empty_policy()), NAMES[1]: ("1", empty_policy()),
                             NAMES[2]: ("2", empty_policy())})
    r4, got = await c.response()
    assert got == {NAMES[0]: "3"}
    # Envoy refuses r3 (already superseded by r4): still a withdrawal of every shard.
    await c.ask(NAMES, nonce=r3.nonce, version="1", error="refused shard 2")
    r5, got = await c.response()
    assert set(got) == set(NAMES) and len(set(got.values())) == 1 and ".empty." in r5.version_info
    [status] = xds.status()
    assert status.withdrawn and status.nacks == 1 and status.last_nack == "refused shard 2"
    # The next publish sends every shard again (Envoy holds the empty policy in each).
    await c.ask(NAMES, nonce=r5.nonce, version=r5.version_info)
    xds.publish_shards("4", {n: ("4" if n == NAMES[1] else v, empty_policy())
                             for n, v in zip(NAMES, ("3", "1", "2"), strict=True)})
    _, got = await c.response()
    assert got == {NAMES[0]: "3", NAMES[1]: "4", NAMES[2]: "2"}


async def test_an_envoy_rendered_for_other_shards_gets_nothing_and_is_logged(served, caplog) -> None:
    """A gateway rendered with another shard count subscribes to names this server does not
    serve: it is sent nothing (its filters keep the empty default: every call to ext_authz),
    and the mismatch is logged once."""
    xds, c = served
    xds.publish_shards("1", {n: ("1", empty_policy()) for n in NAMES})
    others = shard_names(2)
    await c.ask(others)
    await c.ask(others)
    reading = asyncio.ensure_future(c.call.read())
    done, _ = await asyncio.wait({reading}, timeout=0.5)
    assert not done, "a response for names the server does not serve"
    warnings = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
    assert len(warnings) == 1 and all(n in warnings[0] for n in others), warnings
    # Asking for our names on the same stream: served.
    await c.ask(NAMES)
    _, got = await c.response(reading)
    assert set(got) == set(NAMES)


async def test_an_envoy_rendered_for_another_principal_claim_gets_nothing() -> None:
    """The gateway's node metadata says which claim its principal header carries
    (``with_fast_path``); a server matching another claim sends that Envoy nothing (its
    upstreams would see one claim as the principal while the policy matched another). An
    Envoy rendered for the same claim, or whose node says nothing (rendered by hand), is served."""
    events: list[tuple[str, str]] = []
    xds = FastPathXds(ttl_s=30, names=NAMES, principal_claim="sub", on_event=lambda kind, node: events.append((kind, node)))
    xds.publish_shards("1", {n: ("1", empty_policy()) for n in NAMES})
    server, port = await serve_ads(xds)
    clients = {claim: Client(port, node=claim or "by-hand", claim=claim) for claim in ("email", "sub", None)}
    try:
        for c in clients.values():
            await c.ask(NAMES)
        reading = asyncio.ensure_future(clients["email"].call.read())
        for claim in ("sub", None):
            _, got = await clients[claim].response()
            assert set(got) == set(NAMES)
        done, _ = await asyncio.wait({reading}, timeout=0.5)
        assert not done, "an Envoy rendered for another claim was sent the policy"
        assert ("mismatch", "email") in events and ("mismatch", "sub") not in events
        assert [s.acked_version for s in xds.status() if s.node == "email"] == [""]
    finally:
        for c in clients.values():
            c.call.cancel()
            await c.channel.close()
        await server.stop(0)


class DeltaClient:
    """One scripted delta ADS stream."""

    def __init__(self, port: int, node: str = "delta") -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()
        self.node = node

        async def send() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
            while True:
                yield await self.requests.get()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).DeltaAggregatedResources(send())

    async def ask(self, names: list[str] = (), *, held: dict[str, str] | None = None, nonce: str = "",  # type: ignore[assignment]
                  error: str = "") -> None:
        r = discovery_pb2.DeltaDiscoveryRequest(type_url=ECDS_TYPE, resource_names_subscribe=names,
                                                initial_resource_versions=held or {}, response_nonce=nonce)
        r.node.id = self.node
        if error:
            r.error_detail.code, r.error_detail.message = 3, error
        await self.requests.put(r)

    async def response(self) -> discovery_pb2.DeltaDiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), 5)

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def _policy(tag: str) -> http_rbac_pb2.RBAC:
    """A distinct config per ``tag`` (its shadow stat prefix)."""
    rbac = empty_policy()
    rbac.shadow_rules_stat_prefix = f"{tag}_"
    return rbac


async def test_delta_resume_renews_what_an_envoy_holds_and_sends_the_rest() -> None:
    """A reconnecting Envoy says what it holds. Of another server process's publish (new
    objects, same labels and configs), the resources whose versions it holds are renewed
    body-less; one it holds in an older version, and one it does not hold, are sent with
    their bodies; its ACK of both responses leaves it holding the current policy. A refusal
    of the renewal (it no longer holds them) gets everything with bodies, no withdrawal."""
    events: list[str] = []
    first = FastPathXds(ttl_s=30, names=NAMES)
    first.publish_shards("1", {n: ("1", _policy(f"p{k}")) for k, n in enumerate(NAMES)})
    held = dict((n, first._shards[n][0]) for n in NAMES[:2])  # noqa: SLF001 (what an Envoy of `first` holds)
    held[NAMES[1]] = resource_version("0", _policy("p1"))  # an older version of shard 1

    xds = FastPathXds(ttl_s=30, names=NAMES, on_event=lambda kind, node: events.append(kind))
    xds.publish_shards("1", {n: ("1", _policy(f"p{k}")) for k, n in enumerate(NAMES)})
    server, port = await serve_ads(xds)
    c = DeltaClient(port)
    try:
        await c.ask(NAMES, held=held)
        renewal, full = await c.response(), await c.response()
        assert [(r.name, r.HasField("resource")) for r in renewal.resources] == [(NAMES[0], False)]
        assert renewal.resources[0].version == held[NAMES[0]] and renewal.resources[0].ttl.seconds == 30
        assert {r.name: _label(r) for r in full.resources} == {NAMES[1]: "1", NAMES[2]: "1"}
        assert "resume" in events
        await c.ask(nonce=renewal.nonce)  # superseded ACK: ignored
        await c.ask(nonce=full.nonce)
        for _ in range(100):
            if [s.acked_version for s in xds.status()] == ["1"]:
                break
            await asyncio.sleep(0.02)
        assert [s.acked_version for s in xds.status()] == ["1"]
        await c.close()

        # Another reconnect holding everything, whose renewal Envoy refuses: all sent in full.
        c = DeltaClient(port, node="delta-2")
        await c.ask(NAMES, held={n: xds._shards[n][0] for n in NAMES})  # noqa: SLF001
        renewal = await c.response()
        assert [r.HasField("resource") for r in renewal.resources] == [False] * len(NAMES)
        await c.ask(nonce=renewal.nonce, error="type URL '' embedded in an individual Any")
        again = await c.response()
        assert {r.name: _label(r) for r in again.resources} == dict.fromkeys(NAMES, "1")
        assert "expired" in events and not any(s.withdrawn or s.nacks for s in xds.status())
    finally:
        await c.close()
        await server.stop(0)


async def test_delta_resume_is_refused_after_a_withdrawal() -> None:
    """After ``withdraw()`` every resource is the empty policy under a new version: an Envoy
    holding the policy before it is sent the empty one in full, never renewed."""
    xds = FastPathXds(ttl_s=30, names=NAMES)
    xds.publish_shards("1", {n: ("1", _policy(f"p{k}")) for k, n in enumerate(NAMES)})
    held = {n: xds._shards[n][0] for n in NAMES}  # noqa: SLF001
    xds.withdraw("grants unreadable")
    server, port = await serve_ads(xds)
    c = DeltaClient(port)
    try:
        await c.ask(NAMES, held=held)
        r = await c.response()
        assert all(res.HasField("resource") and ".empty." in res.version for res in r.resources), r
        assert {res.name for res in r.resources} == set(NAMES)
    finally:
        await c.close()
        await server.stop(0)


async def test_nothing_is_sent_before_the_first_publish_and_a_hold_is_judged_then() -> None:
    """A server that has not published yet (it is learning modes at start) answers nobody:
    the Envoy keeps what it holds. Its hold is judged against the first publish: a part it
    holds in that version is renewed, not sent."""
    xds = FastPathXds(ttl_s=30, names=NAMES)
    policies = {n: ("1", _policy(f"p{k}")) for k, n in enumerate(NAMES)}
    held = {n: resource_version("1", rbac) for n, (_, rbac) in policies.items()}
    server, port = await serve_ads(xds)
    c = DeltaClient(port)
    try:
        await c.ask(NAMES, held={NAMES[0]: held[NAMES[0]], NAMES[1]: "0+stale"})
        reading = asyncio.ensure_future(c.response())
        done, _ = await asyncio.wait({reading}, timeout=0.5)
        assert not done, "answered before anything was published"
        xds.publish_shards("1", policies)
        renewal = await reading
        assert [(r.name, r.HasField("resource")) for r in renewal.resources] == [(NAMES[0], False)]
        full = await c.response()
        assert {r.name: _label(r) for r in full.resources} == {NAMES[1]: "1", NAMES[2]: "1"}
    finally:
        await c.close()
        await server.stop(0)
