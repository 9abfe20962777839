"""Prometheus metrics of the ext_authz server.

One registry per server. With ``--workers N`` every worker writes to a shared
``PROMETHEUS_MULTIPROC_DIR`` and the supervising process serves the merged view. There, a
component's ``stats()`` (``watch_stats``) cannot be read at scrape time (the supervisor holds
no component), so each worker copies them into a per-worker gauge (``pid`` label) every
``STATS_REFRESH_S`` seconds instead.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .verdict import Verdict

log = logging.getLogger(__name__)

#: How often a worker (``--workers N``) copies its components' stats into /metrics.
STATS_REFRESH_S = 2.0


def merged_by_supervisor() -> bool:
    """Whether this process is a worker of ``--workers N``: its metrics reach /metrics only
    through ``PROMETHEUS_MULTIPROC_DIR`` (the supervisor serves them), never its registry."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)


class Metrics:
    """The server's counters and histograms, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._watched: list[tuple[Gauge, Callable[[], dict[str, float]]]] = []
        self._refresher: threading.Thread | None = None
        r = self.registry
        self.decisions = Counter("rpcauthz_decisions", "Decisions by outcome, mode and rule.",
                                 ["outcome", "mode", "rule"], registry=r)
        self.latency = Histogram("rpcauthz_decision_seconds", "Time to answer one Check.",
                                 ["outcome"], buckets=_BUCKETS, registry=r)
        self.reflection_errors = Counter("rpcauthz_reflection_errors",
                                         "Mode lookups that failed, by error code.", ["code"],
                                         registry=r)
        self.store_errors = Counter("rpcauthz_store_errors", "Store operations that failed.",
                                    ["op"], registry=r)
        self.audit_dropped = Counter("rpcauthz_audit_dropped",
                                     "Audit events dropped (queue full or write failed).",
                                     ["why"], registry=r)
        self.approvals_used = Counter("rpcauthz_approvals_used",
                                      "Approval uses spent by checks (a spend later given back is "
                                      "counted in rpcauthz_approval_uses_given_back too).", ["mode"],
                                      registry=r)
        self.approval_uses_given_back = Counter(
            "rpcauthz_approval_uses_given_back",
            "Spent approval uses given back because their check was not answered allow (spend voids).",
            registry=r)
        # Dry-run rollout (extauthz/dry_run.py): refusals let through, by what would have happened.
        self.dry_run = Counter("rpcauthz_dry_run_decisions",
                               "Calls allowed only because their service is in dry-run.",
                               ["shadow", "mode"], registry=r)
        self.refused_peers = Counter("rpcauthz_refused_peers",
                                     "Checks, access log and ADS streams refused because the peer is not an authenticated Envoy.",
                                     registry=r)
        self.serving = Gauge("rpcauthz_serving",
                             "1 while gRPC health says SERVING (this replica can decide), else 0.",
                             registry=r, multiprocess_mode="livemin")
        # Envoy's fast path (extauthz/access_log.py): access log entries by what became of them.
        self.fast_path_entries = Counter(
            "rpcauthz_fast_path_entries",
            "Envoy fast-path access log entries: received, audited, malformed (not audited), "
            "not_fast_path (not an RBAC allow: not audited), not_audited (audit.allows off).",
            ["result"], registry=r)
        # The fast path's audit events by how they were made durable (extauthz/spooled_audit.py).
        self.fast_path_audit_writes = Counter(
            "rpcauthz_fast_path_audit_writes",
            "Fast-path audit events by path: direct (one store transaction) or spool (handed to the "
            "local spool, shipped later: the store failed or was slower than audit.direct_write_ms).",
            ["path"], registry=r)
        # Envoy's access log streams of fast-path allows, by how they ended (extauthz/access_log.py).
        self.fast_path_als_streams = Counter(
            "rpcauthz_fast_path_als_streams",
            "Envoy access log (ALS) streams of fast-path allows that ended: closed (the messages "
            "ended: Envoy closed it, stopped, was killed or lost the connection), cancelled (the "
            "RPC was cancelled: a reset, or this server stopping), error (this server failed the "
            "stream, e.g. the audit spool could not be written).",
            ["end"], registry=r)
        self.fast_path_als_open = Gauge("rpcauthz_fast_path_als_streams_open",
                                        "Envoy access log (ALS) streams of fast-path allows open now.",
                                        registry=r, multiprocess_mode="livesum")
        # The fast path (fastpath/): pushes to Envoys over ADS, and what they said.
        self.fast_path_events = Counter("rpcauthz_fast_path_xds_events",
                                        "ADS stream events: connect, disconnect, ack, nack, refused (not an authenticated Envoy), "
                                        "mismatch, expired, resume.",
                                        ["event"], registry=r)
        self.fast_path_pushes = Counter("rpcauthz_fast_path_pushes",
                                        "Fast-path policies compiled and pushed.", registry=r)
        self.fast_path_policy_bytes = Gauge("rpcauthz_fast_path_policy_bytes",
                                            "Size of the current fast-path RBAC policy.",
                                            registry=r, multiprocess_mode="livemax")
        self.fast_path_lag = Histogram("rpcauthz_fast_path_lag_seconds",
                                       "From a grant or mode change seen to its push to Envoy.",
                                       buckets=_BUCKETS + (5.0, 10.0), registry=r)
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self.in_flight = Gauge("rpcauthz_checks_in_flight", "Checks being decided now.",
                               registry=r, multiprocess_mode="livesum")

    def record(self, v: Verdict, seconds: float) -> None:
        key = (v.kind.value, v.mode_name, v.rule)
        children = self._children.get(key)
        if children is None:  # label lookups are not free; the label sets are few
            children = self._children[key] = (self.decisions.labels(*key),
                                              self.latency.labels(v.kind.value))
        children[0].inc()
        children[1].observe(seconds)

    def watch_stats(self, name: str, stats: Callable[[], dict[str, float]]) -> None:
        """Export a component's ``stats()`` numbers (cache sizes, hits) as the gauge
        ``rpcauthz_<name>_stat{stat}``: read at each scrape, or, in a worker of ``--workers N``,
        copied every ``STATS_REFRESH_S`` seconds (with a ``pid`` label: one series per live
        worker; aggregate them in the query, e.g. ``max by (stat)`` for ages)."""
        if not merged_by_supervisor():
            self.registry.register(_StatsCollector(name, stats))
            return
        gauge = Gauge(f"rpcauthz_{name}_stat", f"Numbers reported by the {name}.", ["stat"],
                      registry=self.registry, multiprocess_mode="liveall")
        self._watched.append((gauge, stats))
        self.refresh_stats()
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_forever, name="metrics-stats", daemon=True)
            self._refresher.start()

    def refresh_stats(self) -> None:
        """Copy every watched ``stats()`` into its gauge now (workers of ``--workers N``)."""
        for gauge, stats in list(self._watched):
            for k, val in _numbers(stats).items():
                gauge.labels(k).set(val)

    def _refresh_forever(self) -> None:
        # Its own thread, as a scrape would be: a stats() that reads a file or a database
        # (the spool's depth) must not hold up the event loop's checks.
        while True:
            time.sleep(STATS_REFRESH_S)
            try:
                self.refresh_stats()
            except Exception:  # a broken stats() must not stop the others' refresh
                log.exception("could not refresh the components' stats for /metrics")


def _numbers(stats: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``stats()``'s numeric values by name; nothing if it fails (a broken stats() must not
    break /metrics)."""
    try:
        values = stats() or {}
    except Exception:
        return {}
    return {str(k): float(v) for k, v in sorted(values.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _StatsCollector:
    def __init__(self, name: str, stats: Callable[[], dict[str, float]]) -> None:
        self._name, self._stats = name, stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(f"rpcauthz_{self._name}_stat",
                                f"Numbers reported by the {self._name}.", labels=["stat"])
        for k, val in _numbers(self._stats).items():
            fam.add_metric([k], val)
        yield fam
