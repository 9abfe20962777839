"""The fast path's ADS server against the real Envoy binary: a NACKed update and a dead control
plane withdraw the fast path (Envoy's shadow result turns "denied": every call would go to
ext_authz), an Envoy that (re)connects gets the current policy.

A small Envoy: a fixed principal in jwt_authn's metadata namespace (set_metadata), the RBAC
filter over ECDS/ADS from this test's server, a direct response; the access log says what
the shadow engine answered."""
from __future__ import annotations

import asyncio
import pathlib
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from envoy.extensions.matching.input_matchers.metadata.v3 import metadata_pb2

from devstack.processes import EnvoyProcess, free_port
from fastpath.compile import compile_policy
from fastpath.envoy_config import rbac_filter
from fastpath.xds import FastPathXds, PolicySource
from policy import Grant, GrantSet, Mode, Role
from reflection_cache.types import ServiceModes
from tests.support.xds_envoy import serve_ads, xds_envoy_config

pytestmark = pytest.mark.envoy

PATH = "/a.v1.S/Get"
STATS = "http.t.rbac.rpcauthz_fast_."
TTL = 2.0


def _envoy_config(xds_port: int, log: pathlib.Path) -> dict[str, Any]:
    alice = {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "envoy.filters.http.jwt_authn", "value": {"jwt_payload": {"sub": "alice"}}}]}}
    return xds_envoy_config(xds_port, log, [alice, rbac_filter()])


class Harness:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.xds = FastPathXds(ttl_s=TTL)
        self.server: grpc.aio.Server | None = None
        self.log = tmp / "access.log"
        self.envoy: EnvoyProcess | None = None

    async def start_server(self) -> None:
        self.server, _ = await serve_ads(self.xds, self.port)

    def start_envoy(self, name: str = "envoy") -> None:
        self.log = self.tmp / f"{name}-access.log"
        self.envoy = EnvoyProcess(_envoy_config(self.port, self.log), self.tmp, name=name).wait_ready()

    async def shadow(self, path: str = PATH) -> str | None:
        """One call through Envoy; what the RBAC shadow engine answered (from Envoy's stats;
        None: the filter did not run)."""
        assert self.envoy is not None
        envoy = self.envoy
        before = envoy.stats(STATS)
        req = urllib.request.Request(f"http://127.0.0.1:{envoy.port}{path}", data=b"x", method="POST")
        await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5).read())
        after = envoy.stats(STATS)
        changed = [k.rsplit(".", 1)[1] for k in after if after[k] != before.get(k)]
        if not changed:
            return None
        assert len(changed) == 1, (before, after)
        return {"shadow_allowed": "allowed", "shadow_denied": "denied"}[changed[0]]

    async def until(self, want: str, timeout: float) -> float:
        """Seconds until a call's shadow result is ``want`` (TimeoutError after ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if await self.shadow() == want:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no call was shadow-{want} within {timeout}s")

    async def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self.server is not None:
            await self.server.stop(0)


async def acked(h: Harness, want) -> str:
    """The version Envoy ACKed, once ``want(version)`` holds (Envoy applies before it ACKs)."""
    for _ in range(100):
        version = h.xds.status()[0].acked_version
        if want(version):
            break
        await asyncio.sleep(0.05)
    return version


def _policy(version: str, principal: str = "alice"):
    modes = {s: ServiceModes(s, {"Get": Mode.ENGINEERS_WITHOUT_APPROVAL}) for s in ("a.v1.S", "dry.v1.S")}
    return compile_policy(modes, GrantSet([Grant(principal, Role.ENGINEER)]), datetime.now(UTC),
                          version=version, default_mode=Mode.BREAK_GLASS_ONLY).rbac


async def test_nack_withdraws_dead_control_plane_withdraws_restart_gets_current(tmp_path: pathlib.Path) -> None:
    h = Harness(tmp_path)
    await h.start_server()
    try:
        h.start_envoy()
        h.xds.publish("1", _policy("1"))
        await h.until("allowed", 10)
        assert await acked(h, lambda v: v == "1") == "1"  # the ACK follows Envoy applying it
        [node] = h.xds.status()
        assert node.node == "test-gw" and node.acked_version == "1"
        # A route that turns the filter off (dry-run): no shadow result, so ext_authz would run.
        assert await h.shadow("/dry.v1.S/Get") is None

        # A policy Envoy refuses (a regex that does not compile): not kept, not the old one:
        # the empty policy is pushed, and calls are shadow-denied (to ext_authz).
        bad = _policy("2")
        claim = bad.shadow_matcher.matcher_list.matchers[0].predicate.and_matcher.predicate[1]
        broken = metadata_pb2.Metadata()
        claim.single_predicate.custom_match.typed_config.Unpack(broken)
        broken.value.string_match.safe_regex.regex = "(("
        claim.single_predicate.custom_match.typed_config.Pack(broken)
        h.xds.publish("2", bad)
        await h.until("denied", 5)
        [node] = h.xds.status()
        assert node.nacks == 1 and node.withdrawn and "missing )" in node.last_nack
        assert ".empty." in await acked(h, lambda v: ".empty." in v)
        assert await h.shadow() == "denied"

        # The next good policy is taken again, and refreshes keep it past the TTL.
        h.xds.publish("3", _policy("3"))
        await h.until("allowed", 5)
        await asyncio.sleep(TTL * 2)
        assert await h.shadow() == "allowed"

        # An Envoy (re)started meanwhile gets the current policy at once.
        assert h.envoy is not None
        h.envoy.stop()
        h.start_envoy("envoy2")
        await h.until("allowed", 10)

        # The control plane dies: Envoy drops the policy at the TTL (default config: empty).
        assert h.server is not None
        await h.server.stop(0)
        h.server = None
        took = await h.until("denied", TTL + 5)
        assert took <= TTL + 2, f"withdrawn only after {took:.1f}s (TTL {TTL}s)"
    finally:
        await h.stop()


async def test_withdraw_reaches_every_connected_envoy(tmp_path: pathlib.Path) -> None:
    h = Harness(tmp_path)
    await h.start_server()
    try:
        h.start_envoy()
        assert h.xds.acked_grants_revision() is None and h.xds.stats()["acked_grants_revision"] == -1
        h.xds.publish("1", _policy("1"), PolicySource(grants_revision=41, services=2))
        await h.until("allowed", 10)
        # What the ACKed version was compiled from, for waiting on "Envoy has revision >= R".
        assert await acked(h, lambda v: v == "1") == "1"
        assert h.xds.status()[0].acked_source == PolicySource(41, 2)
        assert h.xds.acked_grants_revision() == 41
        assert h.xds.stats() == {"published_version": 1, "published_grants_revision": 41, "envoys": 1,
                                 "acked_grants_revision": 41, "acked_services": 2}
        h.xds.publish("2", _policy("2"), PolicySource(grants_revision=42, services=2))
        assert await acked(h, lambda v: v == "2") == "2"
        assert h.xds.acked_grants_revision() == 42
        h.xds.withdraw("test: grants unavailable")
        await h.until("denied", 5)
        assert (await acked(h, lambda v: v.startswith("2.empty."))).startswith("2.empty.")
        # The empty policy was compiled from nothing: no revision to wait for.
        assert h.xds.acked_grants_revision() is None and h.xds.stats()["acked_grants_revision"] == -1
    finally:
        await h.stop()
