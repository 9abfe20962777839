"""Keeps the fast path's policy current: recompile on grant or mode changes, push, debounced.

Runs in the ext_authz server's event loop. Every ``poll_s`` it looks (from memory, no I/O)
at the grants the server decides with (a new ``GrantSet`` object after every applied change:
LISTEN/NOTIFY deltas, polling, reloads) and, every ``modes_check_s``, at what the reflection
cache knows (and asks it to refresh entries past their TTL, which fast-path calls no longer
do). A change waits ``debounce_s`` for more, then one compile (in a thread) and one push. At
``CompiledPolicy.recompile_at`` (a grant about to expire) it recompiles without a change.
With ``shards`` > 1 the policy is compiled in parts (``compile_shards``) and a push carries
the parts whose content changed (one, for one grant change).

At start (``warm``) the server may first learn the modes of the services it knows of, so
that its first policy is not narrower than the one Envoys hold from the server before it.

Fail closed: grants that cannot be read (the store lost past ``grants_max_staleness_s``) or
a compile that fails withdraw the fast path (the empty policy) until a compile succeeds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from policy import GrantSet, Mode
from reflection_cache.types import ServiceModes

from .compile import JWT_SUB, CompiledPolicy, IdentitySource, compile_shards, shard_names
from .xds import FastPathXds, PolicySource

log = logging.getLogger("fastpath.publisher")


class GrantSource(Protocol):
    def current(self) -> GrantSet: ...


async def static_services(services_at: Callable[[str], Awaitable[list[str]]], static: Mapping[str, str], *,
                          deadline_s: float) -> set[str]:
    """The services behind the static reflection endpoints (``static``: a service name or a
    package prefix -> endpoint): what each endpoint lists (``services_at``, the reflection
    cache's), all endpoints at once, for at most ``deadline_s``. For an endpoint that cannot
    list them in time, its keys in ``static`` stand in (a key that is a package prefix is then
    asked as a service and not found). Nothing here raises for one endpoint."""
    by_endpoint: dict[str, list[str]] = {}
    for key, endpoint in static.items():
        by_endpoint.setdefault(endpoint, []).append(key)
    endpoints = list(by_endpoint)
    tasks: list[asyncio.Future[list[str]]] = [asyncio.ensure_future(services_at(e)) for e in endpoints]
    if tasks:
        await asyncio.wait(tasks, timeout=deadline_s)
    out: set[str] = set()
    for endpoint, task in zip(endpoints, tasks, strict=True):
        if task.done() and not task.cancelled() and task.exception() is None:
            out.update(task.result())
            continue
        if not task.done():
            task.cancel()
            why = f"no list within {deadline_s:g}s"
        else:
            why = str(task.exception()) if not task.cancelled() else "cancelled"
        log.info("warming: the services behind %s not listed (%s); asking its map keys %s instead",
                 endpoint, why, ", ".join(sorted(by_endpoint[endpoint])))
        out.update(by_endpoint[endpoint])
    return out


async def warm_modes(fetch: Callable[[str], Awaitable[object]], services: Iterable[str], *,
                     deadline_s: float, concurrency: int = 16) -> tuple[int, int]:
    """``fetch`` (the reflection cache's ``get``) each of ``services``, at most ``concurrency``
    at once, for at most ``deadline_s`` in all: (learned, not learned: failed or cut off by
    the deadline). A failure is the cache's to remember; nothing here raises for one."""
    queue = list(services)
    learned = failed = 0

    async def worker() -> None:
        nonlocal learned, failed
        while queue:
            service = queue.pop()
            try:
                await fetch(service)
                learned += 1
            except Exception as e:  # noqa: BLE001 (an unknown or unreachable service: learnt later, or never)
                failed += 1
                log.debug("warming %s: %s", service, e)
    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, len(queue))))]
    pending: set[asyncio.Task[None]] = set()
    if workers:
        _done, pending = await asyncio.wait(workers, timeout=deadline_s)
    for w in pending:  # each is mid-fetch
        w.cancel()
    return learned, failed + len(queue) + len(pending)


class KnownModes(Protocol):
    """The reflection cache's view for the compiler (``reflection_cache.ReflectionCache``)."""

    def known(self) -> dict[str, ServiceModes]: ...

    def refresh_stale(self) -> int: ...


@dataclasses.dataclass
class PushRecord:
    """One push: what was compiled and how long each step took (for metrics and docs)."""

    version: str
    compile_s: float
    #: From the first change seen to the push (debounce + compile + hand-over).
    lag_s: float
    #: The whole policy's serialized size (every shard).
    size_bytes: int
    engineers: int
    engineer_paths: int
    #: Summed over shards (a service with contributors in several shards counts in each).
    contributor_services: int
    #: The grants revision compiled (``GrantSet.revision``) and the services with modes.
    source: PolicySource | None = None
    #: The shards whose content changed and their size: what this push sends an Envoy
    #: that held the previous one.
    changed_shards: int = 1
    changed_bytes: int = 0


class Publisher:
    """Compiles and pushes to ``xds``; ``run()`` until cancelled."""

    def __init__(self, xds: FastPathXds, grants: GrantSource, modes: KnownModes, *,
                 default_mode: Mode, dry_run: Iterable[str] = (),
                 identity: IdentitySource = JWT_SUB, horizon: timedelta,
                 debounce_s: float = 0.1, poll_s: float = 0.05, modes_check_s: float = 1.0,
                 max_path_length: int = 512, max_regex_chars: int = 50_000, shards: int = 1,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_push: Callable[[PushRecord], None] | None = None,
                 warm: Callable[[], Awaitable[object]] | None = None) -> None:
        """``shards``: the parts the policy is compiled in; ``xds`` must serve their names
        (``shard_names(shards)``). ``warm``: awaited once before the first compile (the
        server learns the modes of the services it knows of, ``warm_modes``)."""
        if xds.names != shard_names(shards):
            raise ValueError(f"the xDS server serves {xds.names}, not the {shards} shard(s) {shard_names(shards)}")
        self.shards = shards
        self.xds, self.grants, self.modes = xds, grants, modes
        self.default_mode, self.dry_run, self.identity = default_mode, frozenset(dry_run), identity
        self.horizon, self.debounce_s, self.poll_s = horizon, debounce_s, poll_s
        self.modes_check_s = modes_check_s
        self.max_path_length, self.max_regex_chars = max_path_length, max_regex_chars
        self.clock = clock
        self.on_push = on_push or (lambda record: None)
        self.warm = warm
        self._versions = itertools.count(1)
        #: The published policy, by shard (None: withdrawn or not compiled yet).
        self.parts: list[CompiledPolicy] | None = None
        self.last_push: PushRecord | None = None
        self.withdrawn: str | None = None

    async def run(self) -> None:
        """Until cancelled. An unexpected error withdraws the fast path, is logged, and the
        loop starts over (a bug must never leave a stale policy in place)."""
        if self.warm is not None:
            try:
                await self.warm()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warming the modes before the first policy failed; compiling what is known")
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("fast-path publisher failed; withdrawing the fast path")
                self.parts, self.withdrawn = None, f"publisher failed: {e!r}"
                self.xds.withdraw(self.withdrawn)
                await asyncio.sleep(max(self.poll_s, 1.0))

    async def _loop(self) -> None:
        seen_grants: GrantSet | None = None
        seen_modes: Mapping[str, ServiceModes] | None = None
        modes: Mapping[str, ServiceModes] = {}
        next_modes_check = 0.0
        changed_at: float | None = None
        while True:
            now = time.monotonic()
            try:
                grants = self.grants.current()
            except Exception as e:
                if self.withdrawn is None:
                    self.withdrawn = f"grants unavailable: {e}"
                    self.xds.withdraw(self.withdrawn)
                seen_grants = None  # recompile once they are back
                await asyncio.sleep(self.poll_s)
                continue
            if now >= next_modes_check:
                modes = self.modes.known()
                self.modes.refresh_stale()
                next_modes_check = now + self.modes_check_s
            recompile_at = self.recompile_at
            due = recompile_at is not None and self.clock() >= recompile_at
            if grants is not seen_grants or modes != seen_modes or due:
                if changed_at is None:
                    changed_at = now
                if due or seen_grants is None or now - changed_at >= self.debounce_s:
                    seen_grants, seen_modes = grants, modes
                    await self._push(grants, dict(modes), changed_at)
                    changed_at = None
                    continue
            await asyncio.sleep(self.poll_s)

    @property
    def current(self) -> CompiledPolicy | None:
        """The published policy when it is one part (``shards`` = 1), else None."""
        return self.parts[0] if self.parts is not None and len(self.parts) == 1 else None

    @property
    def recompile_at(self) -> datetime | None:
        """When the published policy must be recompiled (its earliest part's moment)."""
        moments = [p.recompile_at for p in self.parts or () if p.recompile_at is not None]
        return min(moments) if moments else None

    async def _push(self, grants: GrantSet, modes: dict[str, ServiceModes], changed_at: float) -> None:
        version = str(next(self._versions))
        started = time.monotonic()
        try:
            parts = await asyncio.to_thread(
                compile_shards, modes, grants, self.clock(), shards=self.shards,
                previous=self.parts, default_mode=self.default_mode, dry_run=self.dry_run,
                horizon=self.horizon, identity=self.identity, max_path_length=self.max_path_length,
                max_regex_chars=self.max_regex_chars)
        except Exception as e:
            log.exception("fast-path compile failed")
            self.parts = None
            self.withdrawn = f"compile failed: {e}"
            self.xds.withdraw(self.withdrawn)
            return
        compile_s = time.monotonic() - started
        source = PolicySource(grants.revision, len(modes))
        self.xds.publish_parts(version, parts, source)
        before = self.parts
        self.parts, self.withdrawn = parts, None
        changed = [p for k, p in enumerate(parts) if before is None or before[k].content != p.content]
        size = sum(p.size_bytes for p in parts)
        self.last_push = PushRecord(
            version, compile_s, time.monotonic() - changed_at, size,
            sum(p.engineers for p in parts), max(p.engineer_paths for p in parts),
            sum(p.contributor_services for p in parts), source,
            changed_shards=len(changed), changed_bytes=sum(p.size_bytes for p in changed))
        log.info("fast path v%s: %d engineers x %d paths, %d contributor services, %d bytes "
                 "(%d of %d shards changed, %d bytes; new labels %s), compiled in %.3f s", version,
                 self.last_push.engineers, self.last_push.engineer_paths, self.last_push.contributor_services, size,
                 len(changed), len(parts), self.last_push.changed_bytes, ",".join(p.version for p in changed) or "-",
                 compile_s)
        self.on_push(self.last_push)
