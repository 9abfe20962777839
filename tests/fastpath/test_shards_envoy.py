"""The policy in shards against the real Envoy binary: Envoy runs, for each call, the shard
``fastpath.compile.shard_of`` names for the caller's claim (its ``consistent_hashing``
matcher and our xxHash64 agree), a publish that changes one shard sends (and makes Envoy
reload) that shard alone, and a NACK of one shard withdraws them all.

A small Envoy: the dispatch filter as the gateway has it (``dispatch_filter``), a direct
response; the claim header comes from the client here (in the gateway, jwt_authn sets it
from the verified token). Each shard's test policy allows everything under its own name, so
the access log says which shard ran."""
from __future__ import annotations

import asyncio
import json
import pathlib
import time
import urllib.request
from typing import Any

import grpc
import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from google.protobuf import any_pb2

from devstack.processes import EnvoyProcess, free_port
from fastpath.compile import SHADOW_PREFIX, shard_names, shard_of
from fastpath.envoy_config import PRINCIPAL_HEADER, dispatch_filter
from fastpath.xds import FastPathXds
from tests.support.xds_envoy import serve_ads, xds_envoy_config

pytestmark = pytest.mark.envoy

SHARDS = 4
NAMES = shard_names(SHARDS)


def _envoy_config(xds_port: int, log: pathlib.Path, api_type: str = "GRPC") -> dict[str, Any]:
    return xds_envoy_config(xds_port, log, [dispatch_filter(SHARDS)], node="shard-gw", api_type=api_type,
                            log_fields={"principal": f"%REQ({PRINCIPAL_HEADER})%"})


def _allow_all(name: str) -> http_rbac_pb2.RBAC:
    """A shard policy that allows every call, reported as policy ``name``."""
    rbac = http_rbac_pb2.RBAC(shadow_rules_stat_prefix=SHADOW_PREFIX)
    rbac.shadow_matcher.on_no_match.action.name = "allow"
    rbac.shadow_matcher.on_no_match.action.typed_config.Pack(rbac_pb2.Action(name=name, action=rbac_pb2.RBAC.ALLOW))
    return rbac


class Recording(FastPathXds):
    """The ADS server, keeping every response it sends."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.sent: list[Any] = []

    def _response(self, *args: Any, **kw: Any) -> Any:
        r = super()._response(*args, **kw)
        self.sent.append(r)
        return r


class Stack:
    def __init__(self, tmp: pathlib.Path, api_type: str = "GRPC", ttl_s: float = 30) -> None:
        self.tmp, self.port, self.api_type = tmp, free_port(), api_type
        self.events: list[str] = []
        self.xds = Recording(ttl_s=ttl_s, names=NAMES, on_event=lambda kind, node: self.events.append(kind))
        self.log = tmp / "access.log"
        self.server: grpc.aio.Server | None = None
        self.envoy: EnvoyProcess | None = None

    async def __aenter__(self) -> Stack:
        self.server, _ = await serve_ads(self.xds, self.port)
        self.envoy = await asyncio.to_thread(
            lambda: EnvoyProcess(_envoy_config(self.port, self.log, self.api_type), self.tmp).wait_ready())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self.server is not None:
            await self.server.stop(0)

    async def calls(self, principals: list[str | None], path: str = "/a.v1.S/Get") -> list[dict[str, str]]:
        """One call per principal (None: no claim header); their access-log lines, in order."""
        assert self.envoy is not None
        port, seen = self.envoy.port, len(self._lines())

        def send() -> None:
            for who in principals:
                req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"x", method="POST")
                if who is not None:  # as jwt_authn sets it: the claim's UTF-8 bytes
                    req.add_header(PRINCIPAL_HEADER, who.encode())  # type: ignore[arg-type]
                urllib.request.urlopen(req, timeout=5).read()
        await asyncio.to_thread(send)
        for _ in range(100):  # Envoy flushes its file access log every second here
            lines = self._lines()
            if len(lines) >= seen + len(principals):
                return lines[seen:seen + len(principals)]
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{len(principals)} calls, {len(self._lines()) - seen} access-log lines")

    def _lines(self) -> list[dict[str, str]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def reloads(self) -> dict[str, int]:
        """Envoy's count of configs it took, per shard resource (ECDS ``config_reload``)."""
        assert self.envoy is not None
        stats = self.envoy.stats("extension_config_discovery.")
        return {n: int(stats.get(f"extension_config_discovery.http_filter.{n}.config_reload", 0)) for n in NAMES}

    async def publish_allow_all(self) -> tuple[dict[str, int], list[str]]:
        """Publish version 1 (every part allows all, as ``<part>@1``) and wait for the ACK;
        Envoy's reloads then, and a principal of each part in order."""
        self.xds.publish_shards("1", {n: ("1", _allow_all(f"{n}@1")) for n in NAMES})
        await self.acked("1")
        return self.reloads(), [next(f"eng{i}" for i in range(100) if shard_of(f"eng{i}", SHARDS) == k)
                                for k in range(SHARDS)]

    async def acked(self, version: str) -> None:
        for _ in range(200):
            if [s.acked_version for s in self.xds.status()] == [version]:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"Envoy never ACKed {version}: {self.xds.status()}")


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_envoy_runs_the_shard_shard_of_names(tmp_path: pathlib.Path, api_type: str) -> None:
    async with Stack(tmp_path, api_type) as s:
        s.xds.publish_shards("1", {n: ("1", _allow_all(n)) for n in NAMES})
        await s.acked("1")
        principals = [f"eng{i}@example.com" for i in range(40)] + ["alice", "ß@例え.jp", "a b"]
        lines = await s.calls([*principals, None])
        ran = {ln["principal"]: ln["fast_path_policy"] for ln in lines[:-1]}
        assert ran == {p: NAMES[shard_of(p, SHARDS)] for p in principals}
        assert len(set(ran.values())) == SHARDS  # every shard is someone's
        # No claim header (no verified claim): no shard runs, no shadow result: ext_authz.
        assert lines[-1]["fast_path"] in (None, "-", "") and lines[-1]["fast_path_policy"] in (None, "-", "")
        # A dry-run route turns the dispatch off: no shard runs.
        (dry,) = await s.calls(["alice"], path="/dry.v1.S/Get")
        assert dry["fast_path"] in (None, "-", "") and dry["fast_path_policy"] in (None, "-", "")


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_a_publish_sends_only_the_changed_shards_and_a_nack_withdraws_all(tmp_path: pathlib.Path,
                                                                               api_type: str) -> None:
    async with Stack(tmp_path, api_type) as s:
        s.xds.publish_shards("1", {n: ("1", _allow_all(f"{n}@1")) for n in NAMES})
        await s.acked("1")
        before = s.reloads()
        assert all(before[n] >= 1 for n in NAMES), before
        by_shard = {k: next(f"eng{i}" for i in range(100) if shard_of(f"eng{i}", SHARDS) == k) for k in range(SHARDS)}

        # Shard 2 changes; the others keep version 1: only shard 2 is sent and reloaded.
        s.xds.publish_shards("2", {n: ("2" if k == 2 else "1", _allow_all(f"{n}@{2 if k == 2 else 1}"))
                                   for k, n in enumerate(NAMES)})
        await s.acked("2")
        after = s.reloads()
        assert after == {n: before[n] + (1 if k == 2 else 0) for k, n in enumerate(NAMES)}, (before, after)
        lines = await s.calls([by_shard[k] for k in range(SHARDS)])
        assert [ln["fast_path_policy"] for ln in lines] == [f"{n}@{2 if k == 2 else 1}" for k, n in enumerate(NAMES)]

        # A publish that changes nothing is still ACKed (one small shard re-sent, not reloaded).
        s.xds.publish_shards("3", {n: (v, r) for n, (v, r) in s.xds._shards.items()})  # noqa: SLF001
        await s.acked("3")
        assert s.reloads() == after

        # Envoy refuses shard 1's new config: every shard is withdrawn (the others' old configs
        # could be wider than what the refused update said), calls are shadow-denied.
        bad = _allow_all("bad")
        bad.shadow_matcher.on_no_match.action.typed_config.CopyFrom(any_pb2.Any(type_url="type.googleapis.com/nonsense"))
        s.xds.publish_shards("4", {n: ("4", bad if k == 1 else _allow_all(f"{n}@4")) for k, n in enumerate(NAMES)})
        for _ in range(200):
            [node] = s.xds.status()
            if node.withdrawn and ".empty." in node.acked_version:
                break
            await asyncio.sleep(0.05)
        assert node.nacks == 1 and node.withdrawn and ".empty." in node.acked_version, node
        lines = await s.calls([by_shard[k] for k in range(SHARDS)])
        assert [ln["fast_path"] for ln in lines] == ["denied"] * SHARDS, lines


async def test_delta_heartbeats_renew_the_ttl_without_bodies_and_a_dead_server_withdraws(tmp_path: pathlib.Path) -> None:
    """Over incremental ADS the TTL refresh is a body-less copy of each resource: Envoy keeps
    the policy well past the TTL without reloading it; once the server is gone, it drops
    every shard at the TTL (calls shadow-denied: ext_authz decides)."""
    ttl = 2.0
    async with Stack(tmp_path, "DELTA_GRPC", ttl_s=ttl) as s:
        reloads, by_shard = await s.publish_allow_all()
        sent_before = len(s.xds.sent)
        await asyncio.sleep(ttl * 2.5)
        heartbeats = s.xds.sent[sent_before:]
        assert len(heartbeats) >= 3, heartbeats
        for h in heartbeats:
            assert {r.name for r in h.resources} == set(NAMES) and not any(r.HasField("resource") for r in h.resources)
            assert all(r.ttl.seconds == 2 for r in h.resources)
        assert s.reloads() == reloads  # renewed, not reloaded
        lines = await s.calls(by_shard)
        assert [ln["fast_path_policy"] for ln in lines] == [f"{n}@1" for n in NAMES]

        assert s.server is not None
        await s.server.stop(0)
        s.server = None
        await asyncio.sleep(ttl + 1.5)
        lines = await s.calls(by_shard)
        assert [ln["fast_path"] for ln in lines] == ["denied"] * SHARDS, lines


async def test_delta_after_a_stall_past_the_ttl_envoy_gets_the_policy_again(tmp_path: pathlib.Path) -> None:
    """This server stalls longer than the TTL: Envoy drops every part (to the empty default)
    and then refuses the next body-less refresh of parts it no longer holds. That refusal is
    not a refused policy: the server sends every part again, with its body, and Envoy holds
    the policy again (no withdrawal)."""
    ttl = 2.0
    async with Stack(tmp_path, "DELTA_GRPC", ttl_s=ttl) as s:
        reloads, by_shard = await s.publish_allow_all()
        time.sleep(ttl + 1.5)  # the server's event loop stalls: no refresh reaches Envoy in time
        for _ in range(100):
            if "expired" in s.events and all(s.reloads()[n] > reloads[n] for n in NAMES):
                break
            await asyncio.sleep(0.1)
        assert "expired" in s.events, s.events
        [node] = s.xds.status()
        assert node.nacks == 0 and not node.withdrawn, node
        lines = await s.calls(by_shard)
        assert [ln["fast_path_policy"] for ln in lines] == [f"{n}@1" for n in NAMES], lines


async def _restart(s: Stack, shards: dict[str, tuple[str, http_rbac_pb2.RBAC]]) -> Recording:
    """Replace the ADS server by a new one (another process's, as after a restart or a
    failover) on the same port, publishing ``shards`` as version 1; wait for Envoy's ACK."""
    assert s.server is not None
    await s.server.stop(0)
    s.xds = Recording(ttl_s=30, names=NAMES, on_event=lambda kind, node: s.events.append(kind))
    s.xds.publish_shards("1", shards)
    s.server, _ = await serve_ads(s.xds, s.port)
    for _ in range(300):  # Envoy reconnects after its backoff
        if [st.acked_version for st in s.xds.status()] == ["1"]:
            return s.xds
        await asyncio.sleep(0.05)
    raise TimeoutError(f"Envoy never ACKed the new server's version 1: {s.xds.status()}")


async def test_delta_reconnect_to_a_server_with_the_same_policy_sends_no_bodies(tmp_path: pathlib.Path) -> None:
    """Envoy reconnects (the server restarted, or another replica serves it) and says which
    versions it holds (``initial_resource_versions``). Where they are the new server's own
    (label and digest of the config), it gets one body-less refresh, no reload, and keeps
    deciding as before. Where the new server has another policy under the same label ``1``
    (another process's version 1), it gets the bodies and decides by the new policy: a
    label alone is never taken for the config."""
    async with Stack(tmp_path, "DELTA_GRPC") as s:
        reloads, by_shard = await s.publish_allow_all()
        same = {n: ("1", _allow_all(f"{n}@1")) for n in NAMES}  # equal configs, new objects

        xds = await _restart(s, same)
        assert "resume" in s.events
        assert all(not r.HasField("resource") for sent in xds.sent for r in sent.resources), xds.sent
        assert {r.name for sent in xds.sent for r in sent.resources} == set(NAMES)
        assert s.reloads() == reloads  # nothing reloaded
        lines = await s.calls(by_shard)
        assert [ln["fast_path_policy"] for ln in lines] == [f"{n}@1" for n in NAMES]

        other = {n: ("1", _allow_all(f"{n}@other")) for n in NAMES}  # same label, other configs
        xds = await _restart(s, other)
        assert all(r.HasField("resource") for sent in xds.sent for r in sent.resources), xds.sent
        assert s.reloads() == {n: reloads[n] + 1 for n in NAMES}
        lines = await s.calls(by_shard)
        assert [ln["fast_path_policy"] for ln in lines] == [f"{n}@other" for n in NAMES]
