"""Shipping audit events out of the store: JSON lines and OpenTelemetry (logs and spans).

Events are written durably by the store first (``create_request``/``update_request`` write
them in the same transaction as the change; the gateway appends its decisions). The
``AuditShipper`` then tails the store's audit log and hands new events to exporters, so an
exporter that is down can delay shipping but never loses an event or blocks a decision.
Delivery is at-least-once: the cursor is saved after each exported batch, and each event's
``id`` lets a consumer drop a repeat.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from policy.audit import AuditEvent
from policy.store import Store

log = logging.getLogger("mpa.audit")

#: How far back each poll looks again, for events committed with a slightly older timestamp.
LOOKBACK = timedelta(seconds=10)


class AuditExporter(Protocol):
    """Receives audit events after they are durable. Raise to have the batch retried."""

    def export(self, events: Sequence[AuditEvent]) -> None: ...


class JsonLinesExporter:
    """Appends one JSON object per event to a file, flushed and fsynced per batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for e in events:
                f.write(json.dumps(e.to_json(), sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _parent_context(e: AuditEvent):
    """A context whose current span is the decision's trace (from ``trace_id``), if any."""
    if not e.trace_id:
        return None
    try:
        trace_id = int(e.trace_id, 16)
        span_hex = e.detail.get("span_id") if isinstance(e.detail, dict) else None
        span_id = int(span_hex, 16) if isinstance(span_hex, str) else random.getrandbits(64)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    ctx = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def _attributes(e: AuditEvent) -> dict[str, str]:
    attrs = {"audit.id": e.id, "audit.kind": e.kind, "enduser.id": e.actor}
    for key, value in (("mpa.request_id", e.request_id), ("rpc.service", e.service),
                       ("rpc.method", e.method), ("mpa.outcome", e.outcome),
                       ("mpa.reason", e.reason)):
        if value:
            attrs[key] = value
    return attrs


class OpenTelemetryExporter:
    """One log record and one span per event, in the decision's trace when it has one.

    Pass the SDK providers to use (an application's configured ones, or in-memory ones in
    tests); by default the global providers are used.
    """

    def __init__(self, tracer_provider=None, logger_provider=None) -> None:
        from opentelemetry import _logs
        tp = tracer_provider or trace.get_tracer_provider()
        lp = logger_provider or _logs.get_logger_provider()
        self._tracer = tp.get_tracer("rpcauthz.mpa.audit")
        self._logger = lp.get_logger("rpcauthz.mpa.audit")

    def export(self, events: Sequence[AuditEvent]) -> None:
        for e in events:
            ts = int(e.at.timestamp() * 1e9)
            parent = _parent_context(e)
            attrs = _attributes(e)
            span = self._tracer.start_span(f"audit {e.kind}", context=parent, start_time=ts,
                                           attributes=attrs)
            span.end(end_time=ts)
            severity = SeverityNumber.WARN if e.kind in ("break_glass.used", "decision.deny") else SeverityNumber.INFO
            self._logger.emit(timestamp=ts, context=trace.set_span_in_context(span),
                              severity_number=severity, severity_text=severity.name,
                              body=json.dumps(e.to_json(), sort_keys=True, default=str),
                              attributes=attrs, event_name=e.kind)


class AuditShipper:
    """Tails the store's audit log and exports each event (at least once).

    ``cursor_path`` keeps the position across restarts; without it a new shipper starts at
    ``start`` (default: now minus the lookback), so history is not re-exported.
    """

    def __init__(self, store: Store, exporters: Sequence[AuditExporter], *,
                 cursor_path: str | os.PathLike[str] | None = None,
                 start: datetime | None = None, batch: int = 500) -> None:
        self.store = store
        self.exporters = list(exporters)
        self.cursor_path = pathlib.Path(cursor_path) if cursor_path else None
        self.batch = batch
        self._shipped: dict[str, datetime] = {}
        self._cursor = start or datetime.now(UTC) - LOOKBACK
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load()

    def _load(self) -> None:
        if self.cursor_path and self.cursor_path.exists():
            data = json.loads(self.cursor_path.read_text())
            self._cursor = datetime.fromisoformat(data["cursor"])
            self._shipped = {i: datetime.fromisoformat(at) for i, at in data["shipped"].items()}

    def _save(self) -> None:
        if not self.cursor_path:
            return
        tmp = self.cursor_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cursor": self._cursor.isoformat(),
                                   "shipped": {i: at.isoformat() for i, at in self._shipped.items()}}))
        os.replace(tmp, self.cursor_path)

    def poll(self) -> int:
        """Export events not shipped yet; returns how many. Exporter errors propagate (retry later)."""
        with self._lock:
            since = self._cursor - LOOKBACK
            while True:
                events = self.store.list_audit(since=since, limit=self.batch)
                new = [e for e in events if e.id not in self._shipped]
                if new or len(events) < self.batch:
                    break
                newest = max(e.at for e in events)  # a full page of repeats: page forward
                if newest <= since:
                    break
                since = newest
            if not new:
                return 0
            for exporter in self.exporters:
                exporter.export(new)
            for e in new:
                self._shipped[e.id] = e.at
            newest = max(e.at for e in events)
            self._cursor = max(self._cursor, newest)
            horizon = self._cursor - 2 * LOOKBACK
            self._shipped = {i: at for i, at in self._shipped.items() if at >= horizon}
            self._save()
            return len(new)

    def start(self, interval: float = 1.0) -> AuditShipper:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    while self.poll() >= self.batch and not self._stop.is_set():
                        pass
                except Exception as e:  # an exporter or the store is down: try again later
                    log.warning("audit shipping failed, will retry: %s", e)
                self._stop.wait(interval)
        self._thread = threading.Thread(target=run, name="audit-shipper", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.poll()  # ship what is left
        except Exception as e:
            log.warning("final audit shipping failed: %s", e)
