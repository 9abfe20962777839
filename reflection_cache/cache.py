"""The reflection cache: a :class:`~reflection_cache.types.ModeSource` for the ext_authz server.

    cache = ReflectionCache(EndpointResolver(template="{name_lower}.internal:50051"))
    modes = await cache.get("rpcauthz.demo.v1.Ledger")      # ServiceModes, or a ReflectionError

Behaviour (settings in :class:`CacheSettings`):

* fresh for ``ttl`` seconds after a successful fetch;
* then, for ``stale_window`` more seconds, the old answer is served at once while exactly one
  background refresh runs (a failed refresh is retried no sooner than ``error_backoff`` later);
* past that window callers wait for a fetch, and if it fails they get its error: a mode is
  never invented;
* single-flight: concurrent misses for one service share one reflection call;
* :class:`UnknownService` is remembered for ``negative_ttl``; other errors for only
  ``error_backoff`` (so an outage is not hammered, and recovery is seen quickly);
* at most ``max_entries`` services are kept; past that, the entry not used for longest
  goes first (second chance: a hit only marks its entry, so a warm lookup is one
  dictionary lookup with no LRU bookkeeping);
* every fetch is bounded by ``deadline`` seconds;
* ``fresh_target(path)`` answers a warm check's target and mode from one lookup in an index
  of every fresh entry's ``/service/method`` paths (see its docstring); ``fresh_mode(path)``
  answers the mode alone from the same index.

Use one cache per event loop (it owns ``grpc.aio`` channels).
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping

import grpc
from google.protobuf.descriptor import Descriptor
from pydantic import ValidationError

from policy import Mode, Target, resolve_mode
from reflection_cache.client import ChannelPool, ReflectionClient, tls_credentials
from reflection_cache.endpoints import EndpointResolver
from reflection_cache.settings import CacheSettings, ReflectionSettings, Tls
from reflection_cache.types import ReflectionError, ReflectionUnavailable, ServiceModes, UnknownMethod, UnknownService
from rpcauthz.settings import describe

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CacheStats:
    """Counters for metrics. ``misses`` counts callers that had to wait for a fetch."""

    hits: int = 0
    stale_serves: int = 0
    misses: int = 0
    negative_hits: int = 0
    fetches: int = 0
    background_refreshes: int = 0
    errors: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class _Entry:
    modes: ServiceModes | None  # None for a remembered error
    error: ReflectionError | None
    fresh_until: float
    stale_until: float
    retry_after: float = 0.0  # no background refresh before this (after a failed one)
    used: bool = False  # hit since it was stored or last passed over for eviction


class ReflectionCache:
    """Implements ``ModeSource.get(service) -> ServiceModes`` over reflection, cached."""

    def __init__(self, resolver: EndpointResolver, settings: CacheSettings | None = None, *,
                 client: ReflectionClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.settings = settings or CacheSettings()
        self.client = client or ReflectionClient(
            deadline=self.settings.deadline,
            channels=ChannelPool(idle_timeout=self.settings.channel_idle_timeout))
        self.clock = clock
        self._stats = CacheStats()
        #: Oldest stored first (a dict keeps insertion order); see ``_store``.
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[ServiceModes]] = {}
        #: ``/service/method`` -> the method's (mode, source), None when the caller's default
        #: applies; for fresh entries only (``fresh_target``), and only paths whose names
        #: ``_checked`` accepts.
        self._paths: dict[str, tuple[Mode, str] | None] = {}
        #: (fresh_until, sequence, service) of the entries whose paths are indexed (no
        #: reference to the entry: tuples of atoms are left alone by the garbage collector).
        self._path_expiry: list[tuple[float, int, str]] = []
        self._next_path_expiry = math.inf
        self._path_seq = 0

    @classmethod
    def from_config(cls, config: Mapping[str, object] | None) -> ReflectionCache:
        """From a ``reflection:`` mapping (parsed YAML; see reflection_cache/settings.py):
        ``{"endpoints": {...}, "cache": {...}, "tls": {...}, "tls_by_endpoint": {...}}``.

        Unknown keys, bad endpoints and settings raise ``ValueError`` naming the key.
        """
        try:
            settings = ReflectionSettings.model_validate(dict(config or {}))
        except ValidationError as e:
            raise ValueError(describe(e, component="reflection")) from None
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: ReflectionSettings) -> ReflectionCache:
        """The cache ``settings`` describe, dialling each endpoint as its TLS settings say."""
        def credentials(tls: Tls | None) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, object], ...]]:
            if tls is None:
                return None, ()
            creds = tls_credentials(*(str(p) if p else None
                                      for p in (tls.ca_file, tls.cert_file, tls.key_file)))
            return creds, ((("grpc.ssl_target_name_override", tls.server_name),)
                           if tls.server_name else ())

        default = credentials(settings.tls_for(None))
        per_endpoint = {endpoint: credentials(settings.tls_for(endpoint))
                        for endpoint in settings.tls_by_endpoint}
        pool = ChannelPool(credentials=default[0], extra_options=default[1], per_endpoint=per_endpoint,
                           idle_timeout=settings.cache.channel_idle_timeout)
        client = ReflectionClient(deadline=settings.cache.deadline, channels=pool)
        return cls(settings.endpoints.resolver(), settings.cache, client=client)

    # -- ModeSource --------------------------------------------------------------------------

    async def get(self, service: str) -> ServiceModes:
        """The options of ``service``; raises a ``ReflectionError`` subclass when unknown."""
        now = self.clock()
        entry = self._entries.get(service)
        if entry is not None:
            if entry.error is not None:
                if now < entry.fresh_until:
                    self._stats.negative_hits += 1
                    raise type(entry.error)(str(entry.error))
            elif entry.modes is not None and now < entry.fresh_until:
                self._stats.hits += 1
                entry.used = True
                return entry.modes
            elif entry.modes is not None and now < entry.stale_until:
                self._stats.stale_serves += 1
                entry.used = True
                if service not in self._inflight and now >= entry.retry_after:
                    self._stats.background_refreshes += 1
                    task = self._start_fetch(service)
                    task.add_done_callback(_consume)
                return entry.modes
        self._stats.misses += 1
        task = self._inflight.get(service) or self._start_fetch(service)
        # shield: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def method_input_type(self, service: str, method: str) -> Descriptor:
        """The input message type of ``/service/method``, read from the service's reflection
        now (not cached: only the approval paths need it, e.g. to show an approver a bound
        call's body). Raises a ``ReflectionError`` (``UnknownMethod`` when there is no such
        method)."""
        from reflection_cache.client import build_pool
        endpoint = self.resolver.resolve(service)
        files = await self.client.fetch_files(service, endpoint)
        pool = build_pool(files, f"service {service}")
        try:
            return pool.FindServiceByName(service).methods_by_name[method].input_type
        except KeyError:
            raise UnknownMethod(f"/{service}/{method}: no such method in the service's "
                                "reflection") from None

    async def services_at(self, endpoint: str) -> list[str]:
        """The services the reflection service at ``endpoint`` lists that this cache would ask
        there (``resolver.resolve`` gives ``endpoint``), in its order; others it lists (its
        own reflection and health services, or names the map sends elsewhere) are left out.
        Not cached. Raises a ``ReflectionError`` when the endpoint cannot list them."""
        out = []
        for name in await self.client.list_services(endpoint, deadline=self.settings.deadline):
            try:
                if self.resolver.resolve(name) == endpoint:
                    out.append(name)
            except UnknownService:
                continue
        return out

    def get_fresh(self, service: str) -> ServiceModes | None:
        """The options of ``service`` if a fresh entry is cached, else None; never waits.

        For a caller's fast path (the ext_authz server decides warm checks without
        awaiting anything): None means "call ``get``", which handles stale entries,
        remembered errors and misses as usual.
        """
        entry = self._entries.get(service)
        if entry is not None and entry.error is None and self.clock() < entry.fresh_until:
            self._stats.hits += 1
            entry.used = True
            return entry.modes
        return None

    def fresh_target(self, path: str, default: Mode) -> tuple[Target, tuple[Mode, str]] | None:
        """The ``Target`` and (mode, source) of the method at ``path`` (``/service/method``,
        as a gRPC request's ``:path`` carries it) when its service's entry is fresh and
        declares the method; else None, which means "parse the path, call ``get`` and
        ``ServiceModes.mode_for``" (they handle bad paths, misses, stale entries, remembered
        errors and unknown methods). Never waits.

        The server's warm path: one lookup in a flat index of every fresh entry's methods
        answers both what the path names and its mode, instead of a parse of the path (or
        a cache of parses), then the entry, its ``ServiceModes`` and that object's method
        table (at 2,500 services each is a cache miss on every check). Only paths that
        ``extauthz.target.parse_path`` accepts as they are are indexed (names checked when
        the entry is stored), so the ``Target`` made here of ``path``'s own two parts is the
        one it would return, without checking the names again; the caller still applies
        its own length limit. Entries leave the index when they stop being fresh, are
        replaced, evicted or invalidated. A hit here does not mark its entry as used for
        second-chance eviction, so the index is kept only while the cache holds at most
        half of ``max_entries`` services (no eviction is near); past that, ``fresh_target``
        answers None and hits go through ``get`` as before.
        """
        if self.clock() >= self._next_path_expiry:
            self._expire_paths()
        found = self._paths.get(path, _NOT_INDEXED)
        if found is _NOT_INDEXED:
            return None
        self._stats.hits += 1
        # Target(service, method) of the request's own two parts (fresh in the CPU's
        # caches, unlike the index's key), without checking the names again: _checked
        # accepted equal ones when they were indexed (two regular expressions saved).
        _, service, method = path.split("/")  # an indexed path has exactly two slashes
        target = _new_object(Target)
        _set_attribute(target, "service", service)
        _set_attribute(target, "method", method)
        return target, (found if found is not None else resolve_mode(None, None, default))

    def fresh_mode(self, path: str, default: Mode) -> tuple[Mode, str] | None:
        """The (mode, source) of the method at ``path`` from the index ``fresh_target``
        reads; None when ``fresh_target`` would answer None."""
        hit = self.fresh_target(path, default)
        return hit[1] if hit is not None else None

    def known(self) -> dict[str, ServiceModes]:
        """Every service whose options ``get`` would answer now without waiting (fresh or
        within the stale window; remembered errors left out). For the fast-path compiler:
        what it compiles is what ext_authz would decide on."""
        now = self.clock()
        return {service: e.modes for service, e in list(self._entries.items())
                if e.modes is not None and e.error is None and now < e.stale_until}

    def refresh_stale(self) -> int:
        """Start a background refresh for every entry past its TTL but still served (as
        ``get`` does on a call), so services whose calls no longer reach ``get`` (the fast
        path answers them in Envoy) still see mode changes. Returns how many started."""
        now = self.clock()
        started = 0
        for service, e in list(self._entries.items()):
            if (e.modes is not None and e.fresh_until <= now < e.stale_until
                    and service not in self._inflight and now >= e.retry_after):
                self._stats.background_refreshes += 1
                self._start_fetch(service).add_done_callback(_consume)
                started += 1
        return started

    # -- operations --------------------------------------------------------------------------

    def invalidate(self, service: str) -> bool:
        """Forget ``service`` (the next call fetches afresh). True if something was cached."""
        old = self._entries.pop(service, None)
        if old is not None:
            self._unindex(service, old)
        return old is not None

    def invalidate_all(self) -> None:
        """Forget every service."""
        self._entries.clear()
        self._clear_paths()

    def stats(self) -> dict[str, int]:
        """Counters plus the current number of ``entries`` and fetches ``inflight``, and
        ``unchanged``: fetches whose answer was the service's previous one byte for byte (its
        files not read again; ``ReflectionClient.unchanged``)."""
        return {**self._stats.as_dict(), "entries": len(self._entries), "inflight": len(self._inflight),
                "unchanged": getattr(self.client, "unchanged", 0)}

    def __contains__(self, service: str) -> bool:
        return service in self._entries

    async def close(self) -> None:
        """Cancel fetches in flight and close the reflection channels."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self.client.close()

    # -- internals ---------------------------------------------------------------------------

    def _store(self, service: str, entry: _Entry) -> None:
        """Keep ``entry`` as the newest; at ``max_entries``, first drop the oldest entry not
        used since it was stored or last passed over (an entry that was used is passed over
        once: it moves to the newest end with its mark cleared)."""
        entries = self._entries
        replaced = entries.pop(service, None)
        if replaced is not None:
            self._unindex(service, replaced)
        while len(entries) >= self.settings.max_entries:
            oldest = next(iter(entries))
            old = entries.pop(oldest)
            if old.used:
                old.used = False
                entries[oldest] = old
            else:
                self._stats.evictions += 1
                self._unindex(oldest, old)
        entries[service] = entry
        if 2 * len(entries) > self.settings.max_entries:
            self._clear_paths()  # see fresh_mode: hits must mark their entries from here on
        elif entry.modes is not None and entry.error is None:
            self._index(service, entry)

    def _index(self, service: str, entry: _Entry) -> None:
        """Put ``entry``'s methods in the path index until its ``fresh_until``."""
        assert entry.modes is not None
        for method, answer in entry.modes.answers().items():
            if _checked(service, method):
                self._paths[f"/{service}/{method}"] = answer
        self._path_seq += 1
        heapq.heappush(self._path_expiry, (entry.fresh_until, self._path_seq, service))
        self._next_path_expiry = self._path_expiry[0][0]

    def _unindex(self, service: str, entry: _Entry) -> None:
        """Take ``entry``'s methods out of the path index (its heap item stays until due)."""
        if entry.modes is not None and self._paths:
            for method in entry.modes.methods:
                self._paths.pop(f"/{service}/{method}", None)

    def _expire_paths(self) -> None:
        """Take every entry that is no longer fresh out of the path index."""
        now, heap = self.clock(), self._path_expiry
        while heap and heap[0][0] <= now:
            service = heapq.heappop(heap)[2]
            entry = self._entries.get(service)
            # The service's entry now (a replaced or evicted one was taken out then): out
            # if it is not fresh any more, kept if a newer, still fresh one replaced it.
            if entry is not None and entry.fresh_until <= now:
                self._unindex(service, entry)
        self._next_path_expiry = heap[0][0] if heap else math.inf

    def _clear_paths(self) -> None:
        self._paths.clear()
        self._path_expiry.clear()
        self._next_path_expiry = math.inf

    def _start_fetch(self, service: str) -> asyncio.Task[ServiceModes]:
        task = asyncio.get_running_loop().create_task(self._fetch(service), name=f"reflect {service}")
        self._inflight[service] = task
        return task

    async def _fetch(self, service: str) -> ServiceModes:
        s = self.settings
        self._stats.fetches += 1
        try:
            endpoint = self.resolver.resolve(service)
            modes = await self.client.fetch(service, endpoint, deadline=s.deadline)
        except UnknownService as e:
            self._stats.errors += 1
            now = self.clock()
            self._store(service, _Entry(None, e, now + s.negative_ttl, now + s.negative_ttl))
            raise
        except Exception as e:
            self._stats.errors += 1
            if not isinstance(e, ReflectionError):
                log.exception("reflection fetch for %s failed unexpectedly", service)
                e = ReflectionUnavailable(f"service {service}: reflection fetch failed: {e!r}")
            now = self.clock()
            old = self._entries.get(service)
            if old is not None and old.modes is not None and now < old.stale_until:
                old.retry_after = now + s.error_backoff  # keep serving stale; retry later
            else:
                self._store(service, _Entry(None, e, now + s.error_backoff, now + s.error_backoff))
            log.warning("reflection for %s failed: %s", service, e)
            raise e
        else:
            now = self.clock()
            self._store(service, _Entry(modes, None, now + s.ttl, now + s.ttl + s.stale_window))
            return modes
        finally:
            self._inflight.pop(service, None)


#: ``fresh_target``'s "no such path in the index" (None there means "the default applies").
_NOT_INDEXED: tuple[Mode, str] = (Mode.UNSPECIFIED, "not indexed")


def _checked(service: str, method: str) -> bool:
    """Is ``/service/method`` a path that ``extauthz.target.parse_path`` accepts as it is
    (returning ``Target(service, method)``)? Names that are not identifiers (reflection
    could answer anything) are left to the full path. (``Target`` and the path grammar
    both fullmatch their names: a trailing newline is refused by both.)
    """
    try:
        Target(service, method)
    except ValueError:
        return False
    return True


#: For ``fresh_target``'s Target of checked names (a frozen dataclass: set as __init__ does).
_new_object = object.__new__
_set_attribute = object.__setattr__


def _consume(task: asyncio.Task[ServiceModes]) -> None:
    """Retrieve a background refresh's outcome (its failure is already counted and logged)."""
    if not task.cancelled():
        task.exception()
