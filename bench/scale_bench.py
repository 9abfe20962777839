"""The same code at two sizes of organisation, side by side, as ratios (issue 13).

It builds each organisation itself: a Backstage catalog (teams of 8 engineers, each team
owning components that declare gRPC services), synthetic gRPC services serving reflection
with the rpcauthz options (2-3 RPCs each), the grants (by running the real sync), and a
history of approval requests bulk-inserted into the store (mostly closed; a fixed few
hundred open, as in a live system where only the last hour's requests are open).

    small   20 engineers,      5 services,    12 RPCs,       300 requests   (the demo's size)
    large   10,000 engineers,  2,500 services, 6,000 RPCs,   1,000,000 requests
    --quick 400 engineers,     100 services,  240 RPCs,      20,000 requests as "large"

    python bench/scale_bench.py [--quick] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Without ``--pg`` only SQLite runs. With it, the bench creates (and drops) its own scratch
databases on that server. Every figure is printed for small and large and as large/small;
the goals of the issue are checked at the end ("met" / "NOT met").

A "warm check" is the decision path of ``extauthz`` without the gRPC framing: the
reflection cache's answer for the method's target and mode (warm: ``fresh_target`` by the
request's ``:path``, as the pipeline asks it), ``GrantCache.current()`` and ``policy.decide``, for a
random service, method and engineer each time (fresh strings each time, as a request's are). Its cost moves
with the machine's load (2 CPUs shared with other work move a p50 by 1.5x between minutes),
so it is timed in rounds that alternate with the same check on a reference organisation of
the small size held in the same process; "warm check p50 / same-moment reference" compares
the two within each round, and the goal uses that (large vs small), not p50s minutes apart.
The gateway's lookup of a caller's open requests is timed the same way, against a store of
the small organisation's requests held beside the measured one.

Memory and collections as the server process has them: the grant cache is loaded, then the
heap is frozen (``extauthz.heap.freeze_long_lived``, what the server does before its first
check), then the reflection cache fills. The RSS probe (a fresh process) loads the grants,
fills the reflection cache, decides once per service, waits for the fill's channels to close
(their idle timeout), then releases freed memory as the server does once a minute
(``extauthz.heap.release_free_memory``).
"""
from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import yaml  # noqa: E402
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2  # noqa: E402

import policy  # noqa: E402
from extauthz.heap import freeze_long_lived, release_free_memory  # noqa: E402
from extauthz.target import parse_path  # noqa: E402
from mpa.config import RequestPolicy  # noqa: E402
from mpa.service import ApprovalService  # noqa: E402
from policy import Grant, Mode, RequestState, Role, Target  # noqa: E402
from policy.grant_cache import GrantCache  # noqa: E402
from policy.grants import GrantSet  # noqa: E402
from policy.stores import open_store  # noqa: E402
from policy.sync import sync  # noqa: E402
from reflection_cache.cache import CacheSettings, ReflectionCache  # noqa: E402
from reflection_cache.client import ChannelPool, ReflectionClient  # noqa: E402
from reflection_cache.endpoints import EndpointResolver  # noqa: E402
from reflection_cache.server import ReflectionServicer, add_servicer  # noqa: E402
from rpcauthz.v1 import options_pb2  # noqa: E402

NOW = datetime.now(UTC)
#: Open requests in the table at any size (the rest is closed history).
OPEN_REQUESTS = 200


@dataclasses.dataclass(frozen=True)
class Org:
    engineers: int
    services: int
    rpcs: int
    requests: int

    @property
    def teams(self) -> int:
        return max(1, self.engineers // 8)


SMALL = Org(engineers=20, services=5, rpcs=12, requests=300)
LARGE = Org(engineers=10_000, services=2_500, rpcs=6_000, requests=1_000_000)
QUICK = Org(engineers=400, services=100, rpcs=240, requests=20_000)


def email(i: int) -> str:
    return f"eng{i}@example.com"


def service_name(i: int) -> str:
    return f"org.s{i}.v1.Svc{i}"


# --- building the organisation ------------------------------------------------------------

def write_catalog(org: Org, directory: Path) -> None:
    """Users, teams of 8 and components owning the services, as multi-document YAML."""
    docs: list[dict] = []
    for t in range(org.teams):
        docs.append({"apiVersion": "backstage.io/v1alpha1", "kind": "Group",
                     "metadata": {"name": f"team{t}"}, "spec": {"type": "team", "children": []}})
    for i in range(org.engineers):
        docs.append({"apiVersion": "backstage.io/v1alpha1", "kind": "User",
                     "metadata": {"name": f"eng{i}"},
                     "spec": {"profile": {"email": email(i)}, "memberOf": [f"team{i % org.teams}"]}})
    for s in range(org.services):
        docs.append({"apiVersion": "backstage.io/v1alpha1", "kind": "Component",
                     "metadata": {"name": f"comp{s}",
                                  "annotations": {"rpcauthz.io/grpc-services": service_name(s)}},
                     "spec": {"type": "service", "lifecycle": "production",
                              "owner": f"group:team{s % org.teams}"}})
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    (directory / "catalog.yaml").write_text(yaml.dump_all(docs, Dumper=dumper))


def methods_of(org: Org, s: int) -> list[str]:
    extra = org.rpcs - 2 * org.services  # services below ``extra`` get a third RPC
    return ["Read", "Write", "Admin"][: 3 if s < extra else 2]


def default_method_mode(s: int, method: str) -> int | None:
    """The synthetic services' method options: ``Read`` is ENGINEERS_WITHOUT_APPROVAL, the
    rest inherit the service default (CONTRIBUTORS_WITH_APPROVAL)."""
    return options_pb2.ENGINEERS_WITHOUT_APPROVAL if method == "Read" else None


def reflection_pool(org: Org, method_mode: Callable[[int, str], int | None] = default_method_mode
                    ) -> descriptor_pool.DescriptorPool:
    """Every synthetic service's file (package ``org.s<i>.v1``, service ``Svc<i>``, service
    default CONTRIBUTORS_WITH_APPROVAL); ``method_mode(service index, method)`` is a method's
    own ``humans_who_can_rpc`` (None: the service default)."""
    pool = descriptor_pool.DescriptorPool()
    for fd in (descriptor_pb2.DESCRIPTOR, empty_pb2.DESCRIPTOR, options_pb2.DESCRIPTOR):
        pool.AddSerializedFile(fd.serialized_pb)
    for s in range(org.services):
        f = descriptor_pb2.FileDescriptorProto(
            name=f"org/s{s}.proto", package=f"org.s{s}.v1", syntax="proto3",
            dependency=["google/protobuf/empty.proto", "rpcauthz/v1/options.proto"])
        svc = f.service.add(name=f"Svc{s}")
        svc.options.Extensions[options_pb2.default_humans_who_can_rpc] = \
            options_pb2.CONTRIBUTORS_WITH_APPROVAL
        for m in methods_of(org, s):
            method = svc.method.add(name=m, input_type=".google.protobuf.Empty",
                                    output_type=".google.protobuf.Empty")
            mode = method_mode(s, m)
            if mode is not None:
                method.options.Extensions[options_pb2.humans_who_can_rpc] = mode
        pool.Add(f)
    return pool


def serve_reflection(org: Org, method_mode: Callable[[int, str], int | None] = default_method_mode
                     ) -> tuple[grpc.Server, int, ReflectionServicer]:
    """One gRPC server answering reflection for every synthetic service (0.0.0.0, so each
    service can be given its own 127.x.y.z endpoint): (server, port, servicer). Setting the
    servicer's ``pool`` (``reflection_pool``) serves other descriptors from the next question
    on. Also used by bench/fast_path_bench.py's scale table."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = ReflectionServicer([service_name(s) for s in range(org.services)], version="v1",
                                  pool=reflection_pool(org, method_mode))
    add_servicer(server, servicer)
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    return server, port, servicer


def start_services(org: Org) -> tuple[grpc.Server, int]:
    """``serve_reflection`` with the default modes: (server, port)."""
    server, port, _servicer = serve_reflection(org)
    return server, port


def endpoint_of(s: int, port: int) -> str:
    """A distinct loopback address per service: one endpoint per service, as in production."""
    return f"127.{1 + s // 62500}.{(s // 250) % 250}.{1 + s % 250}:{port}"


def endpoints(org: Org, port: int) -> dict[str, str]:
    """Every synthetic service's reflection endpoint."""
    return {service_name(s): endpoint_of(s, port) for s in range(org.services)}


def resolver(org: Org, port: int) -> EndpointResolver:
    return EndpointResolver(static=endpoints(org, port))


def bulk_requests(store, kind: str, org: Org) -> None:
    """``n`` requests by every engineer over every service in one statement: the first
    OPEN_REQUESTS pending or approved (not yet due), the rest expired or rejected."""
    n = org.requests
    cols = ("id, requester, service, method, mode, created_at, expires_at, approval_ttl_us, reason, "
            "incident, body_sha256, required_approvals, max_uses, uses, state, approvals, valid_until, "
            "closed_by, closed_at, close_reason, origin")
    mod = "(i % 7)" if kind == "sqlite" else "mod(i, 7)"
    state = (f"CASE WHEN i <= {OPEN_REQUESTS // 2} THEN 'pending' WHEN i <= {OPEN_REQUESTS} "
             f"THEN 'approved' WHEN {mod} = 0 THEN 'rejected' ELSE 'expired' END")
    if kind == "sqlite":
        future = (NOW + timedelta(days=30)).isoformat(timespec="microseconds")
        sql = (f"INSERT INTO requests ({cols}) WITH RECURSIVE n(i) AS "
               f"(SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) "
               "SELECT 'h' || i, 'eng' || (i % %(eng)s) || '@example.com', "
               "'org.s' || (i % %(svc)s) || '.v1.Svc' || (i % %(svc)s), 'Write', 4, "
               "strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', '2025-01-01', '+' || (i / 3) || ' minutes'), "
               f"CASE WHEN i <= {OPEN_REQUESTS} THEN '{future}' ELSE "
               "strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', '2025-01-01', '+' || (i / 3 + 60) || ' minutes') END, "
               f"3600000000, 'history', NULL, NULL, 1, NULL, 0, {state}, '[]', "
               f"CASE WHEN i > {OPEN_REQUESTS // 2} AND i <= {OPEN_REQUESTS} THEN '{future}' END, "
               "NULL, NULL, '', 'user' FROM n")
    else:
        sql = (f"INSERT INTO requests ({cols}) SELECT 'h' || i, 'eng' || mod(i, %(eng)s) || '@example.com', "
               "'org.s' || mod(i, %(svc)s) || '.v1.Svc' || mod(i, %(svc)s), 'Write', 4, "
               "timestamptz '2025-01-01Z' + (i / 3) * interval '1 minute', "
               f"CASE WHEN i <= {OPEN_REQUESTS} THEN now() + interval '30 days' ELSE "
               "timestamptz '2025-01-01Z' + (i / 3 + 60) * interval '1 minute' END, "
               f"3600000000, 'history', NULL, NULL, 1, NULL, 0, {state}, '[]'::jsonb, "
               f"CASE WHEN i > {OPEN_REQUESTS // 2} AND i <= {OPEN_REQUESTS} THEN now() + interval '30 days' END, "
               f"NULL, NULL, '', 'user' FROM generate_series(1, {n}) AS i")
    with store._tx(write=True) as cur:  # noqa: SLF001 - a benchmark's bulk load
        cur.execute(sql, {"eng": org.engineers, "svc": org.services})
    with store._tx(write=False) as cur:  # noqa: SLF001
        cur.execute("ANALYZE")


# --- measuring ----------------------------------------------------------------------------

def synthetic_grants(org: Org) -> GrantSet:
    """The grants the sync makes of ``org``'s catalog (engineers; each team contributes to
    its services), built directly: for the reference organisation."""
    grants = [Grant(email(i), Role.ENGINEER) for i in range(org.engineers)]
    for s in range(org.services):
        grants += [Grant(email(i), Role.CONTRIBUTOR, service_name(s))
                   for i in range(s % org.teams, org.engineers, org.teams)]
    return GrantSet(grants, revision=1)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds per call, ``n`` calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def p50(xs: Sequence[float]) -> float:
    return statistics.median(xs)


@contextlib.contextmanager
def scratch_store(kind: str, pg: str | None) -> Iterator[tuple[str, object]]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            url = f"sqlite://{d}/scale.db"
            store = open_store(url)
            try:
                yield url, store
            finally:
                store.close()
        return
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    name = f"rpcauthz_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(**{**conninfo_to_dict(pg), "dbname": name})
    store = open_store(url)
    try:
        yield url, store
    finally:
        store.close()
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(org: Org, kind: str, pg: str | None, rss: bool) -> dict[str, float]:
    fig: dict[str, float] = {}
    server, port = start_services(org)
    reference_server, reference_port = start_services(SMALL)
    try:
        with scratch_store(kind, pg) as (url, store), scratch_store(kind, pg) as (_, reference), \
                tempfile.TemporaryDirectory() as cat:
            bulk_requests(reference, kind, SMALL)  # the same-moment reference of the gateway's lookup
            write_catalog(org, Path(cat))
            t = time.perf_counter()
            sync(store, catalog=[cat])
            fig["sync first (s)"] = time.perf_counter() - t
            rev = store.grants_revision()
            t = time.perf_counter()
            sync(store, catalog=[cat])
            fig["sync unchanged (s)"] = time.perf_counter() - t
            assert store.grants_revision() == rev, "an unchanged sync wrote"
            store.put_grant(Grant("by-hand@example.com", Role.ENGINEER))  # the revision moves:
            t = time.perf_counter()                                        # parse and diff again
            sync(store, catalog=[cat])
            fig["sync unchanged after a grant change (s)"] = time.perf_counter() - t
            t = time.perf_counter()
            bulk_requests(store, kind, org)
            fig["bulk insert requests (s)"] = time.perf_counter() - t
            fig.update(_store_figures(org, store, reference))
            fig.update(asyncio.run(_decision_figures(org, url, store, port, reference_port)))
            if rss:
                fig["RSS decision path (MB)"] = _rss_probe(org, url, port)
    finally:
        server.stop(0)
        reference_server.stop(0)
    return fig


def _store_figures(org: Org, store, reference) -> dict[str, float]:
    fig: dict[str, float] = {}
    rng = random.Random(1)
    service = ApprovalService(store, RequestPolicy())
    fig["sweep (ms)"] = 1e3 * p50(timed(service.sweep_expired, 20))
    fig["reviewable list (ms)"] = 1e3 * p50(timed(
        lambda: service.list(email(rng.randrange(org.engineers)), scope="reviewable"), 20))
    fig["my requests (ms)"] = 1e3 * p50(timed(
        lambda: service.list(email(rng.randrange(org.engineers)), scope="mine", limit=20), 50))

    fig.update(_gateway_lookup_figures(org, store, reference))
    fig["grants full load (ms)"] = 1e3 * p50(timed(store.load_grants, 3))
    return fig


def _gateway_lookup_figures(org: Org, store, reference) -> dict[str, float]:
    """The gateway's per-call lookup of a caller's open requests (as extauthz/pipeline.py
    asks it), timed in rounds alternating with the same lookup on a small-organisation store
    held at the same moment: a p50 alone moves with the machine's load between minutes."""
    def lookup(o: Org, s, rng: random.Random) -> Callable[[], object]:
        return lambda: s.find_requests(
            requester=email(rng.randrange(o.engineers)), service=service_name(rng.randrange(o.services)),
            method="Write", states=[RequestState.PENDING, RequestState.APPROVED])
    ours, theirs = lookup(org, store, random.Random(1)), lookup(SMALL, reference, random.Random(1))
    timed(ours, 100), timed(theirs, 100)
    mine: list[float] = []
    relative: list[float] = []
    for _ in range(11):
        a, b = timed(ours, 150), timed(theirs, 150)
        mine += a
        relative.append(p50(a) / p50(b))
    return {"gateway find_requests (us)": 1e6 * p50(mine),
            "gateway find_requests / same-moment reference": p50(relative)}


async def _decision_figures(org: Org, url: str, store, port: int,
                            reference_port: int) -> dict[str, float]:
    fig: dict[str, float] = {}
    rng = random.Random(2)
    gc.collect()
    gcache = GrantCache(store, reload_interval=30, max_staleness=120).start()
    reference_grants = synthetic_grants(SMALL)
    freeze_long_lived()  # as the server does once its grants are loaded, before serving
    rcache = ReflectionCache(resolver(org, port), CacheSettings(ttl=3600, stale_window=3600))
    reference = ReflectionCache(resolver(SMALL, reference_port), CacheSettings(ttl=3600, stale_window=3600))
    # (wall, CPU of the collecting thread, generation, objects walked, objects collected)
    pauses: list[tuple[float, float, int, int, int]] = []
    started: list[tuple[float, float, int]] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gen = info["generation"]
            objects = sum(len(gc.get_objects(g)) for g in range(gen + 1)) if gen < 2 else -1
            started.append((time.perf_counter(), time.thread_time(), objects))
        elif started:
            wall, cpu, objects = started.pop()
            pauses.append((time.perf_counter() - wall, time.thread_time() - cpu, info["generation"], objects,
                           info["collected"]))
    try:
        for s in range(org.services):
            await rcache.get(service_name(s))
        for s in range(SMALL.services):
            await reference.get(service_name(s))
        fig["reflection fetch, channel held (CPU ms)"] = await _fetch_cpu(
            org, port, ChannelPool(idle_timeout=None))
        fig["reflection fetch, dialled afresh (CPU ms)"] = await _fetch_cpu(
            org, port, ChannelPool(max_channels=1))
        fig["GrantSet entries"] = len(gcache.current())

        def checker(o: Org, modes_of: ReflectionCache, grants: Callable[[], GrantSet]):
            async def check() -> None:
                s = rng.randrange(o.services)
                path = f"/{service_name(s)}/{rng.choice(methods_of(o, s))}"
                # as extauthz.pipeline: the target and mode by the request's :path, else
                # the path parsed and the mode through get()
                hit = modes_of.fresh_target(path, Mode.BREAK_GLASS_ONLY)
                if hit is None:
                    target = parse_path(path)
                    hit = target, (await modes_of.get(target.service)).mode_for(
                        target.method, Mode.BREAK_GLASS_ONLY)
                policy.decide(email(rng.randrange(o.engineers)), hit[0], hit[1][0], grants(), (), NOW)
            return check
        check = checker(org, rcache, gcache.current)
        check_reference = checker(SMALL, reference, lambda: reference_grants)

        # Timings go into arrays of doubles, which the collector does not track: a list of
        # millions of floats (the checks run while a slow reconcile goes on) made a young
        # collection walk it, a 45-65 ms "pause" of this bench's own making.
        async def run(n: int, one=check) -> array.array[float]:
            out = array.array("d")
            for _ in range(n):
                t = time.perf_counter()
                await one()
                out.append(time.perf_counter() - t)
            return out

        await run(2000)
        await run(2000, check_reference)
        gc.callbacks.append(on_gc)
        # Rounds alternate with the reference check, so both see the machine alike.
        quiet = array.array("d")
        relative: list[float] = []
        for _ in range(15):
            ours, theirs = await run(1500), await run(1500, check_reference)
            quiet += ours
            relative.append(p50(ours) / p50(theirs))
        fig["warm check p50 (us)"] = 1e6 * p50(quiet)
        fig["warm check p50 / same-moment reference"] = p50(relative)
        fig["warm check max (ms)"] = 1e3 * max(quiet)

        # a full reconcile on the same process, in its thread, while checks run
        t = threading.Thread(target=gcache.refresh)
        reconcile_started = time.perf_counter()
        t.start()
        during = await run(20)
        while t.is_alive():
            during += await run(20)
        t.join()
        fig["warm check p50 during full reconcile (us)"] = 1e6 * p50(during)
        # Long when the checks keep the interpreter busy: the reconcile's thread waits for
        # the lock each time the store's driver hands it back.
        fig["full reconcile while checks run (s)"] = time.perf_counter() - reconcile_started

        # one grant change at a time, seen by two replicas (own store connections each)
        replicas = [GrantCache(open_store(url), reload_interval=30,  # default poll / NOTIFY
                               max_staleness=120).start() for _ in range(2)]
        await asyncio.sleep(0.5)
        seen: list[float] = []
        during, during_reference = array.array("d"), array.array("d")
        for i in range(5):
            who = f"newcomer{i}@example.com"
            t0 = time.perf_counter()
            await asyncio.to_thread(store.put_grant, Grant(who, Role.ENGINEER))
            while True:  # checks run at least once per change (NOTIFY can be that quick)
                visible = all(r.current().is_engineer(who, NOW) for r in replicas)
                if visible:
                    seen.append(time.perf_counter() - t0)
                during += await run(50)
                during_reference += await run(20, check_reference)
                if visible:
                    break
        fig["grant change visible in all replicas, max (s)"] = max(seen)
        fig["warm check p50 during grant changes (us)"] = 1e6 * p50(during)
        fig["... / same-moment reference"] = p50(during) / p50(during_reference)
        fig["full loads by replicas after start"] = sum(r.stats["full_loads"] - 1 for r in replicas)
        for r in replicas:
            r.close()
            r._store.close()  # noqa: SLF001
        gc.callbacks.remove(on_gc)
        # Wall time includes the machine taking the CPU away mid-collection (2 shared CPUs);
        # the collecting thread's CPU time is the collection's own work.
        fig["longest GC pause during checks (ms)"] = 1e3 * max((p[0] for p in pauses), default=0.0)
        fig["longest GC pause during checks, CPU (ms)"] = 1e3 * max((p[1] for p in pauses), default=0.0)
        # Which collection it was: its generation and the objects it walked (-1: a full one,
        # not counted; counting is itself a walk), for telling a young collection after a
        # reload from a full one.
        longest = max(pauses, key=lambda p: p[1], default=(0.0, 0.0, -1, -1, -1))
        fig["longest GC pause during checks: generation"] = longest[2]
        fig["longest GC pause during checks: objects walked"] = longest[3]
        # Garbage it freed (a cycle holding e.g. a store connection runs its finalizer there).
        fig["longest GC pause during checks: objects collected"] = longest[4]
        fig["GC runs during checks"] = len(pauses)

        gc.collect()
        fig["gc-tracked objects (k)"] = len(gc.get_objects()) / 1e3
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - t0)
        fig["full gc (ms)"] = 1e3 * p50(times)
        fig["frozen objects (k)"] = gc.get_freeze_count() / 1e3
    finally:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)
        gcache.close()
        await rcache.close()
        await reference.close()
        gc.unfreeze()  # the next measurement starts as this one did
    return fig


async def _fetch_cpu(org: Org, port: int, pool: ChannelPool) -> float:
    """CPU per refresh of every service through ``pool``: with ``idle_timeout=None`` each
    endpoint's channel from the first pass is reused; with ``max_channels=1`` every fetch
    dials (as each refresh does with the default 1 s idle timeout and one endpoint per
    service, a refresh being once per cache ttl)."""
    client = ReflectionClient(channels=pool)
    cache = ReflectionCache(resolver(org, port), CacheSettings(ttl=3600, stale_window=3600), client=client)
    try:
        for s in range(org.services):
            await cache.get(service_name(s))
        cache.invalidate_all()
        t = time.process_time()
        for s in range(org.services):
            await cache.get(service_name(s))
        return 1e3 * (time.process_time() - t) / org.services
    finally:
        await cache.close()


def _rss_probe(org: Org, url: str, port: int) -> float:
    """RSS of a fresh process holding the decision path's caches full (grants, reflection)."""
    out = subprocess.run([sys.executable, __file__, "--rss-probe", url, str(port),
                          str(org.engineers), str(org.services), str(org.rpcs)],
                         capture_output=True, text=True, timeout=600, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rss_probe(url: str, port: int, org: Org) -> None:
    import extauthz.pipeline  # noqa: F401 - what the server process has loaded besides the caches
    import extauthz.server  # noqa: F401

    async def main() -> None:
        store = open_store(url)
        gcache = GrantCache(store, reload_interval=30, max_staleness=120).start()
        rcache = ReflectionCache(resolver(org, port), CacheSettings(ttl=3600, stale_window=3600))
        for s in range(org.services):
            await rcache.get(service_name(s))
        for s in range(org.services):
            modes = await rcache.get(service_name(s))
            policy.decide(email(s % org.engineers), Target(service_name(s), "Read"),
                          modes.mode_for("Read", Mode.BREAK_GLASS_ONLY)[0], gcache.current(), (), NOW)
        # As the server's once-a-minute release finds it (extauthz/heap.py): the fill's
        # channels closed after their idle timeout, then freed memory handed back.
        await asyncio.sleep(rcache.settings.channel_idle_timeout + 1.5)
        release_free_memory()
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        print(f"{rss / 1e6:.1f}")
        gcache.close()
        await rcache.close()
        store.close()
    asyncio.run(main())


# --- report -------------------------------------------------------------------------------

GOALS: list[tuple[str, Callable[[dict, dict], bool], str]] = [
    ("warm check p50 large/small <= 1.1x (each against its same-moment reference)",
     lambda s, big: big["warm check p50 / same-moment reference"]
     <= 1.1 * s["warm check p50 / same-moment reference"], ""),
    ("gateway find_requests large/small <= 1.1x (each against its same-moment reference)",
     lambda s, big: big["gateway find_requests / same-moment reference"]
     <= 1.1 * s["gateway find_requests / same-moment reference"], ""),
    ("RSS of the decision path <= 100 MB",
     lambda s, big: big["RSS decision path (MB)"] <= 100, ""),
    ("grant change in every replica within 1 s",
     lambda s, big: big["grant change visible in all replicas, max (s)"] <= 1.0, ""),
    ("warm checks during grant changes <= 1.2x quiet p50 (each against its same-moment reference)",
     lambda s, big: big["... / same-moment reference"] <= 1.2 * big["warm check p50 / same-moment reference"], ""),
    ("unchanged sync <= 2 s",
     lambda s, big: big["sync unchanged (s)"] <= 2.0, ""),
    ("sweep and reviewable list <= 20 ms",
     lambda s, big: big["sweep (ms)"] <= 20 and big["reviewable list (ms)"] <= 20, ""),
    ("no GC pause above 20 ms during checks (wall)",
     lambda s, big: big["longest GC pause during checks (ms)"] <= 20, ""),
    ("no GC pause above 20 ms of CPU during checks",
     lambda s, big: big["longest GC pause during checks, CPU (ms)"] <= 20, ""),
    ("full gc <= 20 ms",
     lambda s, big: big["full gc (ms)"] <= 20, ""),
    ("no single check above 20 ms (any cause; noisy on a shared machine)",
     lambda s, big: big["warm check max (ms)"] <= 20, ""),
]


def report(kind: str, small: Org, large: Org, a: dict, b: dict) -> list[str]:
    lines = [f"### {kind}: small ({small.engineers} engineers, {small.services} services, "
             f"{small.requests:,} requests) vs large ({large.engineers:,} engineers, "
             f"{large.services:,} services, {large.requests:,} requests)", "",
             "| figure | small | large | large/small |", "|---|---:|---:|---:|"]
    for key in a:
        x, y = a[key], b.get(key, float("nan"))
        ratio = f"{y / x:.2f}x" if x else "-"
        lines.append(f"| {key} | {x:,.2f} | {y:,.2f} | {ratio} |")
    lines += ["", "| goal | |", "|---|---|"]
    for name, ok, _ in GOALS:
        try:
            verdict = "met" if ok(a, b) else "NOT met"
        except KeyError:
            verdict = "not measured"
        lines.append(f"| {name} | {verdict} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small 'large' size, for CI")
    ap.add_argument("--pg", help="PostgreSQL server DSN (scratch databases are created on it)")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS probe process")
    ap.add_argument("--rss-probe", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        url, port, eng, svc, rpcs = args.rss_probe
        rss_probe(url, int(port), Org(int(eng), int(svc), int(rpcs), 0))
        return
    large = QUICK if args.quick else LARGE
    kinds = ["sqlite"] + (["postgresql"] if args.pg else [])
    print(f"python {sys.version.split()[0]}, libyaml {'yes' if yaml.__with_libyaml__ else 'no'}, "
          f"{os.cpu_count()} CPUs")
    for kind in kinds:
        a = measure(SMALL, kind, args.pg, not args.no_rss)
        b = measure(large, kind, args.pg, not args.no_rss)
        print("\n".join(["", *report(kind, SMALL, large, a, b)]), flush=True)


if __name__ == "__main__":
    main()
