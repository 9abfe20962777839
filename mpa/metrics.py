"""Prometheus metrics of the approvals server, served at ``/metrics``.

One registry per app (several servers may run in one process, as in tests and the demo).
``mpa_http_requests_total`` and ``mpa_http_request_seconds`` count and time every request by
route template (never the request id), method and status; ``mpa_audit_events_total`` counts the
audit events the server shipped (its own and the gateway's, from the store) by kind;
``mpa_pending_requests`` is read from the store at scrape time (``-1`` when it cannot be read,
so an alert sees the outage instead of an empty queue).
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from policy import RequestState
from policy.audit import AuditEvent
from policy.store import Store

_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)


class _Pending(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("mpa_pending_requests",
                              "Pending approval requests in the store (-1: store unreadable).",
                              labels=["mode"])
        try:
            found = self.store.find_requests(states=[RequestState.PENDING], limit=100_000)
        except Exception:
            g.add_metric(["all"], -1)
        else:
            by_mode: dict[str, int] = {}
            for r in found:
                by_mode[r.mode.name] = by_mode.get(r.mode.name, 0) + 1
            g.add_metric(["all"], len(found))
            for mode, n in sorted(by_mode.items()):
                g.add_metric([mode], n)
        yield g


class ApprovalsMetrics:
    """The counters, histogram and scrape-time gauge of one approvals app."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter("mpa_http_requests", "HTTP requests by route, method and status.",
                            ["route", "method", "status"], registry=r)
        self.latency = Histogram("mpa_http_request_seconds", "Time to answer one HTTP request.",
                                 ["route"], buckets=_BUCKETS, registry=r)
        self.events = Counter("mpa_audit_events", "Audit events shipped, by kind.", ["kind"],
                              registry=r)
        r.register(_Pending(store))

    def export(self, events: Sequence[AuditEvent]) -> None:
        """Audit exporter: count what the shipper saw."""
        for e in events:
            self.events.labels(e.kind).inc()

    def install(self, app: FastAPI) -> None:
        """Count every request and serve ``/metrics``."""
        @app.middleware("http")
        async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                        ) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                route = request.scope.get("route")
                name = getattr(route, "path", None) or "unmatched"
                self.http.labels(name, request.method, str(status)).inc()
                self.latency.labels(name).observe(time.perf_counter() - started)

        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["ApprovalsMetrics"]
