"""Prometheus metrics of the credential broker, served at ``/metrics`` on ``metrics_listen``.

Off unless ``metrics_listen`` is set in ``broker.yaml`` (a loopback address such as
``127.0.0.1:9464`` is the expected choice: the host's scraper reaches it through a forwarder).
One registry per broker. What is exported (no request ids, principals or reasons):

- ``broker_credential_requests{kind,state}``: requests in the sealed state, read at scrape time
  (``kind="all", state="unreadable"`` = 1 when the state cannot be read);
- ``broker_requests_opened_total{kind}``, ``broker_reviews_total{kind,verdict}`` (verdict
  ``approve`` or ``reject``), ``broker_approvals_total{kind}`` (requests fully approved),
  ``broker_fetches_total{kind}``: counted from the broker's audit events as they are written;
- ``broker_refusals_total{operation,reason}``: calls refused (reason = the refusal's class,
  e.g. ``SelfApproval``, ``NotEligible``, ``Unauthenticated``);
- ``broker_audit_chain_head_seq``: the sequence number of the chained audit log's head
  (``-1`` when no chained log is configured).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from policy import RequestState
from policy.audit import AuditEvent

from .records import AWS_SERVICE

log = logging.getLogger(__name__)

#: Reads (kind, state) -> count of the requests in the sealed state.
Counts = Callable[[], dict[tuple[str, str], int]]


def _kind(event: AuditEvent) -> str:
    return "aws" if event.service == AWS_SERVICE else "kubernetes"


class _State(Collector):
    def __init__(self, counts: Counts | None, sinks: Sequence[Any]) -> None:
        self.counts, self.sinks = counts, sinks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("broker_credential_requests",
                              "Credential requests in the sealed state by kind and state.",
                              labels=["kind", "state"])
        if self.counts is not None:
            try:
                found = self.counts()
            except Exception as e:  # the scrape says so instead of showing an empty broker
                log.warning("metrics: cannot read the sealed state: %s", e)
                g.add_metric(["all", "unreadable"], 1)
            else:
                for kind in ("aws", "kubernetes"):
                    for state in RequestState:
                        g.add_metric([kind, state.value], found.get((kind, state.value), 0))
        yield g
        head = GaugeMetricFamily("broker_audit_chain_head_seq",
                                 "Sequence number of the chained audit log's head (-1: none).")
        seqs = [s.head.seq for s in self.sinks if getattr(s, "head", None) is not None]
        head.add_metric([], max(seqs) if seqs else -1)
        yield head


class BrokerMetrics:
    """The broker's metrics. ``observe`` is an audit notifier; ``refused`` counts refusals."""

    def __init__(self, *, counts: Counts | None = None, audit_sinks: Sequence[Any] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.opened = Counter("broker_requests_opened_total", "Credential requests opened.",
                              ["kind"], registry=r)
        self.reviews = Counter("broker_reviews_total", "Reviews recorded, by verdict.",
                               ["kind", "verdict"], registry=r)
        self.approvals = Counter("broker_approvals_total", "Credential requests fully approved.",
                                 ["kind"], registry=r)
        self.fetches = Counter("broker_fetches_total", "Credentials minted and handed out.",
                               ["kind"], registry=r)
        self.refusals = Counter("broker_refusals_total", "Calls refused, by operation and reason.",
                                ["operation", "reason"], registry=r)
        self._state = _State(counts, audit_sinks)
        r.register(self._state)
        self._server: ThreadingHTTPServer | None = None

    def set_counts(self, counts: Counts) -> None:
        """Read request counts from ``counts`` (``BrokerService.counts``) at scrape time."""
        self._state.counts = counts

    def observe(self, event: AuditEvent) -> None:
        """Count one audit event the broker wrote (use as a notifier)."""
        kind = _kind(event)
        if event.kind == "credential.requested":
            self.opened.labels(kind).inc()
        elif event.kind in ("credential.approved", "request.approval_recorded"):
            self.reviews.labels(kind, "approve").inc()
            if event.kind == "credential.approved":
                self.approvals.labels(kind).inc()
        elif event.kind == "request.rejected":
            self.reviews.labels(kind, "reject").inc()
        elif event.kind == "credential.fetched":
            self.fetches.labels(kind).inc()

    def refused(self, operation: str, error: BaseException) -> None:
        """Count a refused call (``operation`` is the RPC name)."""
        self.refusals.labels(operation, type(error).__name__).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port."""
        handler = MetricsHandler.factory(self.registry)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="broker-metrics", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
