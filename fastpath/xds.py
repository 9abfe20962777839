"""The fast path's xDS server: ADS (state of the world, and delta) serving the policy's ECDS resources.

Every Envoy that connects subscribes to ``rpcauthz_fast_path``
(``type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig``), or, with the policy
in shards, to each shard's resource (``fastpath.compile.shard_names``), and gets the current
compiled RBAC config of each, wrapped in an ``envoy.service.discovery.v3.Resource`` with a
``ttl``. A response carries only the resources that Envoy was not sent yet in their current
version (ECDS is not a full-state type: Envoy keeps the others), so a grant change that
changes one shard sends that shard alone.

While the server lives it re-sends the resources (same versions) every ``heartbeat_s``,
which renews their TTL; when it is gone, Envoy drops each at the TTL and falls back to the
ECDS ``default_config`` (the empty policy): every call then goes to ext_authz again. Over
state-of-the-world ADS a heartbeat carries the bodies (Envoy 1.40's SotW mux drops body-less
heartbeat resources before it renews TTLs; Envoy sees the same config hash and does not
rebuild the filter); over delta ADS (``DeltaAggregatedResources``, the same rules otherwise)
it is the resources' names, versions and TTL only.

Fail closed:

* a NACK withdraws the fast path on that Envoy: the server answers it with the empty
  policy (every resource) under a new version (Envoy would otherwise keep the last
  accepted, possibly wider, policy), and tries again only with the next compiled policy.
  A NACK of a response already superseded counts too: Envoy kept the previous config of
  what that response carried, and a later partial response need not replace it. The one
  NACK that withdraws nothing is of a body-less delta TTL refresh: Envoy refuses one for a
  resource it no longer holds (its TTL ran out while this server stalled; it is on the
  empty default meanwhile), so every resource is sent again with its body;
* ``withdraw()`` (grants unusable, a compile failure) pushes the empty policy everywhere.

Only an authenticated Envoy may subscribe: the policy lists principal names and which methods
they may call. The server passes its ``refuse`` check (the same peer check as Checks and the
access log: mTLS ``client_names``, unix socket, loopback); a refused stream ends with
UNAUTHENTICATED before anything is sent.

Policy versions are ``<n>`` (a count of publishes in this process) and ``<n>.empty.<k>``
for withdrawals. Each resource is published with a label: the ``v<label>/...`` its policy
names carry (the publisher's parts are labelled by their content,
``fastpath.compile.content_label``), a withdrawal's version for the empty policy. A
resource's own version (what Envoy holds it as) is that label and a digest of its config,
``<label>+<digest>``: equal versions mean byte-equal configs, whichever server process made
them. So over delta, an Envoy that reconnects (a dropped connection, this server restarted,
or another replica took the stream) and says it holds a resource at the current version
(``initial_resource_versions``) is not sent its body again: one body-less TTL refresh of what
it holds, which it ACKs, or refuses if it no longer holds it (then it gets everything in
full, as after a stall). A label alone would not do: labels given to ``publish`` need not
name one config. ``status()`` reports what
each connected Envoy (node id) has ACKed, and what that version was compiled from
(``PolicySource``: the grants revision and how many services' modes), so a caller can wait
for "every Envoy holds a policy compiled from grants revision >= R"
(``acked_grants_revision()``) instead of sleeping.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2

from .compile import RESOURCE_NAME, CompiledPolicy, config_digest, empty_policy
from .envoy_config import NODE_METADATA_KEY

log = logging.getLogger("fastpath.xds")

#: The ECDS resource type.
ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """What a compiled policy was compiled from."""

    #: The store's grants revision of the ``GrantSet`` compiled (``GrantSet.revision``).
    grants_revision: int
    #: How many services' modes (from the reflection cache) were compiled.
    services: int


def _all_held(sources: list[PolicySource | None]) -> list[PolicySource] | None:
    """``sources`` when every subscribed Envoy holds a compiled policy (none is None), else
    None (also when no Envoy is subscribed)."""
    held = [src for src in sources if src is not None]
    return held if sources and len(held) == len(sources) else None


@dataclasses.dataclass
class NodeStatus:
    """What one Envoy stream has been sent and has accepted."""

    node: str
    sent_version: str = ""
    acked_version: str = ""
    #: What ``acked_version`` was compiled from; None for the empty policy (withdrawn) or
    #: a policy published without a source.
    acked_source: PolicySource | None = None
    nacks: int = 0
    last_nack: str = ""
    withdrawn: bool = False
    connected_at: float = dataclasses.field(default_factory=time.monotonic)


#: One resource: its version and config.
Shard = tuple[str, http_rbac_pb2.RBAC]


def resource_version(label: str, rbac: http_rbac_pb2.RBAC) -> str:
    """The version Envoy holds a resource as: ``label`` (what its policy names carry, or a
    withdrawal's version) and a digest of the config's bytes, so that two equal versions
    name byte-equal configs even when two server processes made them."""
    return f"{label}+{config_digest(rbac)[:24]}"


def _label(version: str) -> str:
    """The label ``resource_version`` was given (its digest has no ``+``)."""
    return version.rsplit("+", 1)[0]


def _empty_shard(label: str) -> Shard:
    rbac = empty_policy()
    return resource_version(label, rbac), rbac


class _Stream:
    """One Envoy's ADS stream: the nonce it must answer and what it was sent."""

    def __init__(self, node: str) -> None:
        self.status = NodeStatus(node)
        #: Our resource names the Envoy subscribes to (empty: not subscribed).
        self.names: list[str] = []
        self.nonce = ""
        self.nonce_version = ""
        #: What the last response's policy (``nonce``'s) was compiled from.
        self.sent_source: PolicySource | None = None
        #: Each resource's version and config as last sent on this stream.
        self.sent: dict[str, Shard] = {}
        self.warned_names = False
        #: Why this Envoy gets nothing (rendered for another claim), or "".
        self.mismatch = ""
        #: The nonces of the latest body-less TTL refreshes (delta only), to tell their NACKs apart.
        self.refreshes: collections.deque[str] = collections.deque(maxlen=8)
        #: What the Envoy said it holds when it subscribed (delta ``initial_resource_versions``),
        #: until the stream's first answer: those in their current version are renewed, not sent.
        self.held: dict[str, str] = {}

    @property
    def subscribed(self) -> bool:
        return bool(self.names)


class FastPathXds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]  # envoy ships no stubs
    """ADS servicer; ``publish()`` a compiled policy, ``withdraw()`` to take it back."""

    def __init__(self, *, ttl_s: float = 10.0, heartbeat_s: float | None = None,
                 on_event: Callable[[str, str], None] | None = None,
                 refuse: Callable[[grpc.aio.ServicerContext[Any, Any]], str | None] | None = None,
                 names: Sequence[str] = (RESOURCE_NAME,), principal_claim: str | None = None) -> None:
        """``refuse(context)``: why the stream's peer may not have the policy, or ``None``.
        ``names``: the resources served (``fastpath.compile.shard_names``).
        ``principal_claim``: the claim the policy matches; an Envoy whose node metadata says
        it was rendered for another (``fastpath.envoy_config.NODE_METADATA_KEY``) is sent
        nothing: its upstreams would see another claim as the principal of fast-path allows."""
        self.principal_claim = principal_claim
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct and not empty, got {list(names)}")
        self.names = list(names)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else ttl_s / 3
        if not 0 < self.heartbeat_s < ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be positive and below ttl_s ({ttl_s})")
        self._on_event = on_event or (lambda kind, node: None)
        self._refuse = refuse
        self._version = "0.empty.0"
        self._shards: dict[str, Shard] = {n: _empty_shard(self._version) for n in self.names}
        #: (generation, each current resource's size), as ``_smallest`` has needed them.
        self._sizes: tuple[int, dict[str, int]] = (-1, {})
        self._source: PolicySource | None = None
        self._empty_count = itertools.count(1)
        self._nonces = itertools.count(1)
        self._changed = asyncio.Event()
        self._generation = 0
        self._streams: set[_Stream] = set()
        self.published_at: float | None = None
        #: Nothing is sent before the first ``publish``/``withdraw``: an Envoy that connects
        #: while the server starts keeps what it holds (within its TTL) meanwhile.
        self._published = False

    # --- the control side ---------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._version

    @property
    def source(self) -> PolicySource | None:
        """What the current policy was compiled from (None: the empty policy)."""
        return self._source

    def publish(self, version: str, rbac: http_rbac_pb2.RBAC, source: PolicySource | None = None) -> None:
        """Make ``rbac`` (compiled with ``version``, from ``source``) the policy every Envoy
        gets (served unsharded: one resource)."""
        if len(self.names) != 1:
            raise ValueError(f"this server serves {len(self.names)} shards: use publish_shards")
        self.publish_shards(version, {self.names[0]: (version, rbac)}, source)

    def publish_parts(self, version: str, parts: Sequence[CompiledPolicy], source: PolicySource | None = None) -> None:
        """``publish_shards`` of compiled parts, in ``names``' order (``compile_shards``):
        each part under its own version."""
        self.publish_shards(version, {n: (p.version, p.rbac) for n, p in zip(self.names, parts, strict=True)}, source)

    def publish_shards(self, version: str, shards: Mapping[str, Shard], source: PolicySource | None = None) -> None:
        """Make ``shards`` (each resource's label, i.e. what its policy names carry, and
        config; together the policy ``version``, compiled from ``source``) what every Envoy
        gets. Envoys are sent the resources whose version (label and digest) changed."""
        if set(shards) != set(self.names):
            raise ValueError(f"shards must be exactly {self.names}, got {sorted(shards)}")
        self._version, self._source = version, source
        current, self._shards = self._shards, {}
        for n in self.names:
            label, rbac = shards[n]
            # The same config object under the same label keeps its version: not hashed again.
            same = rbac is current[n][1] and _label(current[n][0]) == label
            self._shards[n] = current[n] if same else (resource_version(label, rbac), rbac)
        self._bump()

    def withdraw(self, why: str) -> None:
        """Push the empty policy to every Envoy (everything goes to ext_authz)."""
        log.warning("fast path withdrawn: %s", why)
        self._version = f"{self._base(self._version)}.empty.{next(self._empty_count)}"
        self._shards = {n: _empty_shard(self._version) for n in self.names}
        self._source = None
        self._bump()

    def status(self) -> list[NodeStatus]:
        """The connected Envoys, by node id."""
        return [dataclasses.replace(s.status) for s in self._streams]

    def acked_sources(self) -> list[PolicySource | None]:
        """What each subscribed Envoy's ACKed policy was compiled from (None: the empty
        policy, or nothing ACKed yet)."""
        return [s.status.acked_source for s in list(self._streams) if s.subscribed]  # /metrics' thread

    def acked_grants_revision(self) -> int | None:
        """The lowest grants revision any subscribed Envoy holds a compiled policy of (ACKed),
        or None when no Envoy is subscribed or one holds the empty policy or nothing yet."""
        held = _all_held(self.acked_sources())
        return None if held is None else min(s.grants_revision for s in held)

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics (``rpcauthz_fast_path_stat``): ``published_version`` and
        ``published_grants_revision`` (-1: the empty policy), ``envoys`` subscribed, and over
        them the lowest ``acked_grants_revision`` and ``acked_services`` (-1 while an Envoy
        holds the empty policy or nothing, or none is subscribed)."""
        sources = self.acked_sources()
        held = _all_held(sources)
        return {
            "published_version": float(self._base(self._version)),
            "published_grants_revision": float(self._source.grants_revision) if self._source else -1.0,
            "envoys": float(len(sources)),
            "acked_grants_revision": float(min(s.grants_revision for s in held)) if held else -1.0,
            "acked_services": float(min(s.services for s in held)) if held else -1.0,
        }

    def _bump(self) -> None:
        self._published = True
        self._generation += 1
        self.published_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    @staticmethod
    def _base(version: str) -> str:
        return version.split(".", 1)[0]

    # --- the ADS stream -----------------------------------------------------------------

    async def StreamAggregatedResources(  # noqa: N802 (the gRPC method's name)
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """State-of-the-world ADS (the gateway's ``ads_config.api_type: GRPC``)."""
        async for response in self._serve(request_iterator, context, _SotW()):
            yield response

    async def DeltaAggregatedResources(  # noqa: N802 (the gRPC method's name)
            self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
            context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest,
                                              discovery_pb2.DeltaDiscoveryResponse],
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        """Incremental ADS (``api_type: DELTA_GRPC``): the same resources and rules; the TTL
        refresh is a body-less heartbeat per resource (delta Envoy takes them), so the
        steady traffic no longer grows with the policy's size."""
        async for response in self._serve(request_iterator, context, _Delta()):
            yield response

    async def _serve(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any],
                     protocol: _Protocol) -> AsyncIterator[Any]:
        if self._refuse is not None:
            why = self._refuse(context)
            if why is not None:
                log.warning("refused an ADS stream: %s", why)
                self._on_event("refused", context.peer() or "")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"the fast-path policy is served only to an authenticated Envoy: {why}")
                return
        requests: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for r in request_iterator:
                    await requests.put(r)
            finally:
                await requests.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        stream: _Stream | None = None
        sent_generation = -1
        next_heartbeat = float("inf")
        try:
            while True:
                changed = self._changed
                waits: list[asyncio.Future[object]] = [
                    asyncio.ensure_future(requests.get()), asyncio.ensure_future(changed.wait())]
                timeout = max(0.0, next_heartbeat - time.monotonic())
                try:
                    done, _pending = await asyncio.wait(waits, timeout=timeout,
                                                        return_when=asyncio.FIRST_COMPLETED)
                finally:  # also when the stream is cancelled while waiting
                    for f in waits:
                        if not f.done():
                            f.cancel()
                request: Any = waits[0].result() if waits[0] in done else False
                if request is None:
                    return  # Envoy closed the stream
                send: bool | str = False
                if request is not False:
                    if stream is None:
                        stream = _Stream(request.node.id or context.peer())
                        self._streams.add(stream)
                        self._on_event("connect", stream.status.node)
                        stream.mismatch = self._rendered_for_another(request.node)
                        if stream.mismatch:
                            log.error("Envoy %s: %s; it gets no fast-path policy (every call to ext_authz) "
                                      "until it is rendered for this server", stream.status.node, stream.mismatch)
                            self._on_event("mismatch", stream.status.node)
                    if request.type_url == ECDS_TYPE and not stream.mismatch:
                        send = self._on_request(stream, protocol.names(stream.names, request), request.response_nonce,
                                                request.error_detail.message if request.HasField("error_detail")
                                                and request.error_detail.code != 0 else None,
                                                protocol.acked_version(stream, request), protocol.held(request))
                    if send == "withdraw":
                        yield self._response(stream, protocol, *self._withdrawn_for(stream))
                        next_heartbeat = time.monotonic() + self.heartbeat_s
                        continue
                if stream is None or not stream.subscribed or not self._published:
                    continue
                if send or sent_generation != self._generation:
                    if sent_generation != self._generation:
                        stream.status.withdrawn = False
                    sent_generation = self._generation
                    if stream.status.withdrawn:
                        yield self._response(stream, protocol, *self._withdrawn_for(stream))
                    else:
                        resumed = self._resumed(stream)
                        if resumed:  # what it already holds: renewed, not sent again
                            yield self._response(stream, protocol, self._version,
                                                 {n: self._shards[n] for n in resumed}, self._source, heartbeat=True)
                        lacking = self._changed_for(stream, refill=not resumed)
                        if lacking:
                            yield self._response(stream, protocol, self._version, lacking, self._source)
                    next_heartbeat = time.monotonic() + self.heartbeat_s
                elif time.monotonic() >= next_heartbeat:
                    renew = {n: stream.sent[n] for n in stream.names if n in stream.sent}
                    yield self._response(stream, protocol, stream.status.sent_version, renew, stream.sent_source,
                                         heartbeat=True)
                    next_heartbeat = time.monotonic() + self.heartbeat_s
        finally:
            reader.cancel()
            if stream is not None:
                self._streams.discard(stream)
                self._on_event("disconnect", stream.status.node)

    def _rendered_for_another(self, node: Any) -> str:
        """Why the Envoy of ``node`` was rendered for another server's policy ("" if not, or
        if its node metadata does not say: a gateway rendered by hand)."""
        rendered = node.metadata.fields.get(NODE_METADATA_KEY)
        if rendered is None or self.principal_claim is None:
            return ""
        claim = rendered.struct_value.fields.get("principal_claim")
        if claim is not None and claim.string_value != self.principal_claim:
            return (f"rendered for principal claim {claim.string_value!r}, the policy matches "
                    f"{self.principal_claim!r} (gateway.fast_path.principal_claim vs identity.principal_claim)")
        return ""

    def _on_request(self, stream: _Stream, requested: list[str], nonce: str, nack: str | None,
                    version_info: str, held: Mapping[str, str]) -> bool | str:
        """Handle one request for ``requested`` (the stream's names now), answering ``nonce``
        (a NACK with message ``nack``; an ACK of ``version_info``), from an Envoy that holds
        ``held`` (resource name -> version; delta's first request only); True: send what
        the stream lacks; "withdraw": a NACK."""
        names = [n for n in self.names if n in requested]
        if len(names) != len(requested) and not stream.warned_names:
            stream.warned_names = True  # e.g. a gateway rendered with another shard count
            log.warning("Envoy %s subscribes to fast-path resources this server does not serve: %s "
                        "(served: %s); those filters keep their default (every call to ext_authz)",
                        stream.status.node, sorted(set(requested) - set(names)), self.names)
        added = set(names) - set(stream.names)
        stream.names = names
        stream.held.update((n, v) for n, v in held.items() if n in added)
        if not names:
            return False
        if added or not nonce:
            return True
        if nonce != stream.nonce and nack is None:
            return False  # an answer to an older response: superseded
        if nack is not None and nonce in stream.refreshes:
            # A body-less TTL refresh of a resource Envoy no longer holds (its TTL ran out,
            # e.g. this server stalled): nothing in the policy was refused. Envoy is on the
            # empty default meanwhile; it gets every resource again, with its body.
            log.warning("Envoy %s refused a TTL refresh (%s): it no longer holds the policy; sending it again",
                        stream.status.node, nack[:200])
            self._on_event("expired", stream.status.node)
            stream.refreshes.clear()
            stream.sent.clear()
            return True
        if nack is not None:
            stream.status.nacks += 1
            stream.status.last_nack = nack[:500]
            self._on_event("nack", stream.status.node)
            log.error("Envoy %s rejected fast-path version %s: %s; withdrawing the fast path there",
                      stream.status.node, stream.nonce_version, nack[:500])
            if stream.status.withdrawn:
                return False  # the empty policy itself was refused: nothing narrower to send
            stream.status.withdrawn = True
            return "withdraw"
        stream.status.acked_version = version_info
        stream.status.acked_source = stream.sent_source if version_info == stream.nonce_version else None
        self._on_event("ack", stream.status.node)
        return False

    def _resumed(self, stream: _Stream) -> list[str]:
        """The resources ``stream``'s Envoy said it holds at connect time in their current
        version (byte-equal: the version says so), now taken as sent; asked once, at the
        stream's first answer (after it, Envoy holds what it was sent)."""
        held, stream.held = stream.held, {}
        resumed = [n for n in stream.names if n not in stream.sent and held.get(n) == self._shards[n][0]]
        for n in resumed:
            stream.sent[n] = self._shards[n]
        if resumed:
            self._on_event("resume", stream.status.node)
        return resumed

    def _withdrawn_for(self, stream: _Stream) -> tuple[str, dict[str, Shard]]:
        stream.status.withdrawn = True
        version = f"{self._base(self._version)}.empty.{next(self._empty_count)}"
        return version, {n: _empty_shard(version) for n in stream.names}

    def _changed_for(self, stream: _Stream, *, refill: bool = True) -> dict[str, Shard]:
        """The current resources ``stream`` was not sent in their current version; if none
        (a publish that changed nothing there) and ``refill``, the smallest one again, so the
        Envoy ACKs this version (what ``acked_grants_revision`` waits for) at little cost."""
        changed = {n: self._shards[n] for n in stream.names
                   if stream.sent.get(n, ("",))[0] != self._shards[n][0]}
        if not changed and refill:
            n = self._smallest(stream.names)
            changed = {n: self._shards[n]}
        return changed

    def _smallest(self, names: list[str]) -> str:
        """The smallest of ``names``' current resources; sizes taken once per publish, not
        once per stream (a resource's size is a walk of all of it)."""
        if self._sizes[0] != self._generation:
            self._sizes = (self._generation, {})
        sizes = self._sizes[1]
        for n in names:
            if n not in sizes:
                sizes[n] = self._shards[n][1].ByteSize()
        return min(names, key=sizes.__getitem__)

    def _response(self, stream: _Stream, protocol: _Protocol, version: str, shards: Mapping[str, Shard],
                  source: PolicySource | None = None, *, heartbeat: bool = False) -> Any:
        """A response carrying ``shards`` (each resource's version and config; together the
        policy ``version``, compiled from ``source``), each valid for the TTL; a
        ``heartbeat`` renews their TTLs (with their bodies where the protocol needs them)."""
        resources = []
        for name, (shard_version, rbac) in shards.items():
            resource = discovery_pb2.Resource(name=name, version=shard_version, ttl=_duration(self.ttl_s))
            if not (heartbeat and protocol.bodiless_heartbeats):
                config = extension_pb2.TypedExtensionConfig(name=name)
                config.typed_config.Pack(rbac)
                resource.resource.Pack(config)
            resources.append(resource)
            stream.sent[name] = (shard_version, rbac)
        stream.sent_source = source
        stream.nonce = str(next(self._nonces))
        if heartbeat and protocol.bodiless_heartbeats:
            stream.refreshes.append(stream.nonce)
        stream.nonce_version = version
        stream.status.sent_version = version
        return protocol.response(version, stream.nonce, resources)


class _Protocol:
    """What differs between state-of-the-world and delta ADS for this server."""

    #: Envoy renews a resource's TTL from a body-less copy (delta only, in Envoy 1.40).
    bodiless_heartbeats = False

    def names(self, current: list[str], request: Any) -> list[str]:
        """The resource names the stream asks for after ``request``."""
        raise NotImplementedError

    def acked_version(self, stream: _Stream, request: Any) -> str:
        raise NotImplementedError

    def held(self, request: Any) -> Mapping[str, str]:
        """The resources (name -> version) the Envoy says it holds already (none over SotW)."""
        return {}

    def response(self, version: str, nonce: str, resources: list[discovery_pb2.Resource]) -> Any:
        raise NotImplementedError


class _SotW(_Protocol):
    def names(self, current: list[str], request: discovery_pb2.DiscoveryRequest) -> list[str]:
        return list(request.resource_names)  # the whole list, every time

    def acked_version(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> str:
        return str(request.version_info)

    def response(self, version: str, nonce: str, resources: list[discovery_pb2.Resource]
                 ) -> discovery_pb2.DiscoveryResponse:
        wrapped = []
        for resource in resources:
            any_ = any_pb2.Any()
            any_.Pack(resource)
            wrapped.append(any_)
        return discovery_pb2.DiscoveryResponse(version_info=version, type_url=ECDS_TYPE, nonce=nonce,
                                               resources=wrapped)


class _Delta(_Protocol):
    bodiless_heartbeats = True

    def names(self, current: list[str], request: discovery_pb2.DeltaDiscoveryRequest) -> list[str]:
        gone = set(request.resource_names_unsubscribe)
        names = [n for n in current if n not in gone]
        return names + [n for n in request.resource_names_subscribe if n not in names and n not in gone]

    def acked_version(self, stream: _Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> str:
        return stream.nonce_version  # a delta ACK names the response (nonce), not a version

    def held(self, request: discovery_pb2.DeltaDiscoveryRequest) -> Mapping[str, str]:
        return dict(request.initial_resource_versions)  # sent on a stream's first request

    def response(self, version: str, nonce: str, resources: list[discovery_pb2.Resource]
                 ) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, type_url=ECDS_TYPE, nonce=nonce,
                                                    resources=resources)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
