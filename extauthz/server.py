"""The ext_authz server process: gRPC Authorization + health, metrics, drain, workers.

``serve(settings)`` runs one server in the current event loop until ``stop`` is set (or
SIGTERM/SIGINT arrives): health turns NOT_SERVING, new connections are refused, and checks
in flight finish within ``drain_grace_s``. ``run(settings)`` is the process entry point;
with ``workers > 1`` it starts that many worker processes that share the port through
SO_REUSEPORT, and serves their merged metrics itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fastpath.compile import IdentitySource, shard_names
from fastpath.publisher import Publisher, PushRecord, static_services, warm_modes
from fastpath.xds import FastPathXds
from policy import Role

from .audit_spool import AuditSpool
from .audit_writer import AuditWriter
from .config import Settings, spool_file
from .heap import RELEASE_INTERVAL_S, freeze_long_lived, gc_stats, release_free_memory
from .listeners import PeerCheck, add_listeners
from .metrics import Metrics, merged_by_supervisor
from .pipeline import Authorizer
from .readiness import Readiness
from .spooled_audit import SpooledAuditWriter

if TYPE_CHECKING:
    from policy.grant_cache import GrantCache

log = logging.getLogger("extauthz")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


@dataclasses.dataclass
class Components:
    """What the pipeline needs from the outside world, and how to let go of it."""

    store: Any
    grants: Any
    modes: Any
    close: Callable[[], Awaitable[None]] | None = None
    stats: dict[str, Callable[[], dict[str, float]]] = dataclasses.field(default_factory=dict)


async def open_components(settings: Settings) -> Components:
    """The real store, in-memory grants and reflection cache for ``settings``.

    Call it inside the event loop that will serve: the reflection cache owns grpc.aio channels.
    """
    from policy.grant_cache import GrantCache
    from policy.stores import open_store
    from reflection_cache import ReflectionCache
    store = await asyncio.to_thread(open_store, settings.store_url, poll_interval=settings.grants_poll_s,
                                    statement_timeout=settings.store_statement_timeout_s or None)
    try:
        grants = GrantCache(store, reload_interval=settings.grants_reload_s,
                            max_staleness=settings.grants_max_staleness_s)
        await asyncio.to_thread(grants.start)
    except Exception:
        store.close()
        raise
    modes = ReflectionCache.from_settings(settings.reflection)

    async def close() -> None:
        try:
            await modes.close()
        except Exception:
            log.exception("closing the reflection cache failed")
        for thing in (grants, store):
            try:
                await asyncio.to_thread(thing.close)
            except Exception:  # closing must go on
                log.exception("closing %s failed", type(thing).__name__)

    return Components(store, grants, modes, close,
                      {"reflection_cache": modes.stats, "grant_cache": _grant_stats(grants)})


def _grant_stats(grants: GrantCache) -> Callable[[], dict[str, float]]:
    def stats() -> dict[str, float]:
        age = grants.age()
        return {"revision": grants.revision or 0, "age_seconds": age if age is not None else -1}
    return stats


def grpc_server_options(workers: int = 1) -> list[tuple[str, int]]:
    """The grpc.aio server options (the benchmark's no-op server uses the same)."""
    return [
        # One worker: refuse a port someone else holds. Several: share it on purpose.
        ("grpc.so_reuseport", 1 if workers > 1 else 0),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ]


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # envoy ships no stubs
    """``envoy.service.auth.v3.Authorization/Check`` backed by an ``Authorizer``."""

    def __init__(self, authorizer: Authorizer, peers: PeerCheck | None = None,
                 metrics: Metrics | None = None) -> None:
        self._authorizer = authorizer
        self._peers = peers
        self._metrics = metrics

    async def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 (gRPC name)
                    context: grpc.aio.ServicerContext[external_auth_pb2.CheckRequest,
                                                      external_auth_pb2.CheckResponse],
                    ) -> external_auth_pb2.CheckResponse:
        if self._peers is not None:
            why = self._peers.refusal(context)
            if why is not None:
                # Nothing of the request is read, decided, spent or audited as anyone.
                log.warning("refused a Check: %s", why)
                if self._metrics is not None:
                    self._metrics.refused_peers.inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"ext_authz answers Checks only from an authenticated Envoy: {why}")
        return await self._authorizer.check(request)


def add_fast_path_audit(server: grpc.aio.Server, settings: Settings,
                        audit: AuditWriter | SpooledAuditWriter, metrics: Metrics) -> None:
    """Envoy's access log of fast-path allows into the audit (extauthz/access_log.py), on the
    same listeners and peer check as Checks; and Envoy's own count beside ours on /metrics."""
    from envoy.service.accesslog.v3 import als_pb2_grpc

    from .access_log import AccessLogService
    from .envoy_stats import EnvoyAllowedCollector
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogService(settings, audit, metrics, PeerCheck(settings.listen)), server)
    if settings.fast_path.envoy_admin_urls and not merged_by_supervisor():
        # (with --workers N the supervisor reads it: supervisor_registry)
        metrics.registry.register(EnvoyAllowedCollector(settings.fast_path.envoy_admin_urls,
                                                        settings.fast_path.envoy_allowed_stat))
    if settings.fast_path.audit_file is None:
        log.info("fast path on: fast-path allows are audited from Envoy's access log %r",
                 settings.fast_path.log_name)


async def _release_memory(executor: ThreadPoolExecutor, interval_s: float) -> None:
    """Every ``interval_s``, hand the memory the caches' fills and grant loads freed back to
    the system (extauthz/heap.py), in a worker thread. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            await loop.run_in_executor(executor, release_free_memory)
        except Exception:  # never worth stopping the server for
            log.exception("could not release free memory")


async def serve(settings: Settings, *, components: Components | None = None,
                stop: asyncio.Event | None = None, on_ready: Callable[[int], None] | None = None,
                metrics: Metrics | None = None, serve_metrics: bool = True,
                install_signal_handlers: bool = True, freeze_heap: bool = False) -> None:
    """Run one server until ``stop`` is set or SIGTERM/SIGINT arrives, then drain.

    ``freeze_heap`` (the server process sets it; see extauthz/heap.py): once everything is
    open and before serving, exempt the long-lived objects from garbage collections.
    """
    stop = stop or asyncio.Event()
    if settings.identity.dev_mode:
        log.warning("DEV MODE: the caller's identity is taken from the %r header, NOT from a "
                    "verified token. Anyone can claim to be anyone. Never run this in production.",
                    settings.identity.dev_principal_header)
    metrics = metrics or Metrics()
    owns_components = components is None
    components = components or await open_components(settings)
    for name, fn in components.stats.items():
        metrics.watch_stats(name, fn)
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="extauthz-store")
    spool = None
    spool_at = spool_file(settings.audit)
    audit: AuditWriter | SpooledAuditWriter
    if spool_at is not None:
        spool = AuditSpool(spool_at, settings.audit.spool_max_events, fsync=settings.audit.spool_fsync)
        if not settings.audit.spool_fsync:
            log.warning("AUDIT SPOOL WITHOUT FSYNC (audit.spool_fsync: false): answered checks' events "
                        "survive a kill -9 of this server, not a crash of the host")
        metrics.watch_stats("audit_spool", spool.stats)
        log.info("audit spool: %s (events are on disk before their check is answered)", spool_at)
        audit = SpooledAuditWriter(components.store, metrics, spool, settings.audit.queue_size, executor,
                                   batch_window=settings.audit.batch_window_ms / 1000.0,
                                   replay_interval=settings.audit.replay_interval_s,
                                   ack_timeout=settings.decision_deadline_ms / 1000.0,
                                   direct_timeout=settings.audit.direct_write_ms / 1000.0)
    else:
        log.warning("AUDIT SPOOL OFF (audit.spool_path: null): decision events wait in memory; a kill -9 "
                    "loses the last batch window and a store outage drops events. Never run this in production.")
        audit = AuditWriter(components.store, metrics, settings.audit.queue_size, executor,
                            batch_window=settings.audit.batch_window_ms / 1000.0,
                            replay_interval=settings.audit.replay_interval_s)
    audit.start()
    authorizer = Authorizer(settings, store=components.store, grants=components.grants,
                            modes=components.modes, audit=audit, metrics=metrics, executor=executor)
    server = grpc.aio.server(options=grpc_server_options(settings.workers))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(authorizer, PeerCheck(settings.listen), metrics), server)
    tailer = None
    if settings.fast_path.enabled:
        add_fast_path_audit(server, settings, audit, metrics)
        if settings.fast_path.audit_file is not None:
            from .file_audit import FileAuditTailer
            assert spool_at is not None and isinstance(audit, SpooledAuditWriter)  # Settings requires the spool
            tailer = FileAuditTailer(settings, audit, metrics, spool_at)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    publisher = _fast_path(settings, server, components, metrics)
    served = add_listeners(server, settings.listen)
    port = int(served[0].rsplit(":", 1)[1]) if settings.listen.port is not None else 0
    metrics_server = None
    if serve_metrics and settings.metrics.port is not None:
        from prometheus_client import start_http_server
        try:
            metrics_server, _thread = start_http_server(settings.metrics.port, settings.metrics.host,
                                                        registry=metrics.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {settings.metrics.host}:{settings.metrics.port}: "
                          f"{e.strerror}") from None
        print(f"extauthz: metrics on http://{settings.metrics.host}:{metrics_server.server_port}/metrics",
              flush=True)
    metrics.watch_stats("gc", gc_stats)
    if freeze_heap:
        took = freeze_long_lived()
        log.info("froze %d long-lived objects out of the garbage collector's way (%.0f ms)",
                 gc_stats()["frozen_objects"], took * 1e3)
    await server.start()

    async def publish(serving: bool, reason: str) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", AUTHZ_SERVICE):
            await health_servicer.set(name, status)
        metrics.serving.set(1 if serving else 0)

    # The store opened and the grants loaded: this replica can decide. From now on the
    # readiness monitor says when it cannot (grants stale, store lost).
    await publish(True, "started")
    publishing = asyncio.get_running_loop().create_task(publisher.run()) if publisher else None
    releasing = asyncio.get_running_loop().create_task(_release_memory(executor, RELEASE_INTERVAL_S))
    tailing = asyncio.get_running_loop().create_task(tailer.run(), name="fast-path-audit-file") if tailer else None
    h = settings.health
    readiness = Readiness(store=components.store, grants=components.grants, executor=executor,
                          publish=publish, interval_s=h.interval_s, store_timeout_s=h.store_timeout_s,
                          store_lost_after_s=h.store_lost_after_s)
    readiness.serving = True
    readiness.start()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("extauthz serving on %s (pid %d, default mode %s, deadline %d ms)",
             " and ".join(served), os.getpid(), settings.default_mode.name,
             settings.decision_deadline_ms)
    print(f"extauthz: serving on {' and '.join(served)}", flush=True)
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        log.info("extauthz draining: NOT_SERVING, finishing checks in flight (grace %.1fs)",
                 settings.drain_grace_s)
        await readiness.stop()  # it must not turn a draining server SERVING again
        if publishing is not None:
            publishing.cancel()
        releasing.cancel()
        metrics.serving.set(0)
        await health_servicer.enter_graceful_shutdown()
        if settings.drain_notice_s:
            # Keep answering while Envoy's health checks notice NOT_SERVING and move traffic
            # to the other servers of the cluster; only then refuse new checks.
            await asyncio.sleep(settings.drain_notice_s)
        await server.stop(settings.drain_grace_s)
        if tailing is not None and tailer is not None:
            # Lines it read and wrote but had not yet marked read are read again at the next
            # start: audited once (same event ids).
            tailing.cancel()
            await asyncio.wait([tailing], timeout=5.0)
            tailer.close()
        await audit.close()
        if spool is not None:
            spool.close()
        executor.shutdown(wait=False, cancel_futures=True)
        if owns_components and components.close is not None:
            await components.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        print("extauthz: stopped", flush=True)


def _fast_path(settings: Settings, server: grpc.aio.Server, components: Components,
               metrics: Metrics) -> Publisher | None:
    """With ``fast_path.enabled``: the ADS servicer on ``server`` and its publisher (not started)."""
    fp = settings.fast_path
    if not fp.enabled:
        return None
    peers = PeerCheck(settings.listen)  # the policy names principals: Envoy only, as for Checks

    def on_event(kind: str, node: str) -> None:
        metrics.fast_path_events.labels(kind).inc()
        if kind == "refused":
            metrics.refused_peers.inc()

    names = shard_names(fp.shards)
    xds = FastPathXds(ttl_s=fp.ttl_s, heartbeat_s=fp.refresh_s, on_event=on_event, refuse=peers.refusal,
                      names=names, principal_claim=settings.identity.principal_claim)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    metrics.watch_stats("fast_path", xds.stats)
    ident = settings.identity

    def pushed(record: PushRecord) -> None:
        metrics.fast_path_pushes.inc()
        metrics.fast_path_policy_bytes.set(record.size_bytes)
        metrics.fast_path_lag.observe(record.lag_s)

    async def warm() -> None:
        """Learn the modes of the services named in contributor grants or behind the
        ``reflection.endpoints.static`` endpoints (each endpoint's own list) before the first
        policy (a restarted server's policy then covers what the last one did)."""
        if fp.warm_s <= 0:
            return
        started = time.monotonic()
        try:
            services = {g.service for g in components.grants.current() if g.role is Role.CONTRIBUTOR and g.service}
        except Exception as e:  # grants unreadable: the publisher withdraws; nothing to warm
            log.warning("fast path: not warming the modes (grants unreadable: %s)", e)
            return
        # A static key may be a package prefix: its endpoint's own list says which services
        # are behind it (the keys stand in where it cannot list them).
        services |= await static_services(components.modes.services_at, settings.reflection.endpoints.static,
                                          deadline_s=fp.warm_s / 2)
        left = max(fp.warm_s - (time.monotonic() - started), 0.1)
        learned, missed = await warm_modes(components.modes.get, sorted(services), deadline_s=left)
        log.info("fast path: learnt the modes of %d of %d services named in contributor grants or behind static "
                 "reflection endpoints in %.1f s (%d not learnt: unreachable, unknown, or past fast_path.warm_s)",
                 learned, len(services), time.monotonic() - started, missed)

    log.info("fast path on: serving ECDS %s over ADS (ttl %.0f s)", ", ".join(names), fp.ttl_s)
    return Publisher(
        xds, components.grants, components.modes, default_mode=settings.default_mode,
        dry_run=fp.dry_run_services,
        identity=IdentitySource(ident.metadata_namespace, ident.payload_key, ident.principal_claim),
        horizon=timedelta(seconds=fp.ttl_s + fp.expiry_margin_s), debounce_s=fp.debounce_s,
        poll_s=fp.poll_s, modes_check_s=fp.modes_check_s, max_path_length=settings.max_path_length,
        max_regex_chars=fp.max_regex_chars, shards=fp.shards, on_push=pushed, warm=warm)


def _worker_main(settings_json: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    settings = Settings.model_validate_json(settings_json)
    try:
        asyncio.run(serve(settings, serve_metrics=False, freeze_heap=True))
    except Exception as e:
        print(f"error: worker {os.getpid()}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def run(settings: Settings) -> int:
    """Serve until SIGTERM; with ``workers > 1``, supervise that many worker processes.

    Returns the exit code; start-up failures (store unreachable, port taken, bad reflection
    settings) are printed as one clear line and give 1.
    """
    from policy import StoreError

    if settings.workers > 1:
        return _supervise(settings)
    try:
        asyncio.run(serve(settings, freeze_heap=True))
    except StoreError as e:
        print(f"error: cannot open the store: {e}", file=sys.stderr, flush=True)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def supervisor_registry(settings: Settings, multiproc_dir: str) -> CollectorRegistry:
    """What the supervisor of ``--workers N`` serves on /metrics: the workers' metrics merged
    from ``multiproc_dir``, and Envoy's count of fast-path allows (``envoy_admin_urls``),
    read here at each scrape as a single process reads it."""
    from prometheus_client import multiprocess

    from .envoy_stats import EnvoyAllowedCollector
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    if settings.fast_path.enabled and settings.fast_path.envoy_admin_urls:
        registry.register(EnvoyAllowedCollector(settings.fast_path.envoy_admin_urls,
                                                settings.fast_path.envoy_allowed_stat))
    return registry


def _supervise(settings: Settings) -> int:
    multiproc_dir = tempfile.mkdtemp(prefix="rpcauthz-metrics-")
    # Workers import prometheus_client before any code of ours runs: they must inherit this.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker_main, name=f"extauthz-worker-{i}",
                           args=(settings.model_dump_json(),))
               for i in range(settings.workers)]
    for w in workers:
        w.start()
    metrics_server = None
    if settings.metrics.port is not None:
        from prometheus_client import start_http_server
        metrics_server, _t = start_http_server(settings.metrics.port, settings.metrics.host,
                                               registry=supervisor_registry(settings, multiproc_dir))
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.is_alive() and w.pid:
                os.kill(w.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = 0
    try:
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.2)
                if not w.is_alive() and not stopping and w.exitcode not in (0, None):
                    log.error("worker %s exited with %s; stopping the others", w.name, w.exitcode)
                    code = 1
                    _stop(signal.SIGTERM, None)
        if stopping:
            for w in workers:
                w.join(timeout=settings.drain_grace_s + 5)
                if w.is_alive():
                    w.kill()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        import shutil
        shutil.rmtree(multiproc_dir, ignore_errors=True)
    if any(w.exitcode not in (0, -signal.SIGTERM) for w in workers):
        code = code or 1
    return code
