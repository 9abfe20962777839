"""Decision audit events the store could not take, kept on local disk until it can.

When a batch write to the store fails (store away, slow past its pool timeout), the writer
puts the events here instead of dropping them: one SQLite transaction with
``synchronous=FULL`` (fsync'd before ``put`` returns), bounded by ``max_events`` (past it,
events are dropped and counted, as before). A replay loop writes the oldest events back to the
store once it answers and only then removes them; the store ignores an event id it already
holds, so a replay cut short (crash between the store's commit and the removal here) writes
nothing twice. ``stats()`` gives the depth and the age of the oldest event for /metrics.

The spool also keeps *spend voids* (``spend_voids.py``): decision ids of checks that attempted
to spend an approval use and were not answered allow. They are written in the same fsync'd
transaction as the check's events and applied to the store by ``ship`` after the events.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from policy.audit import AuditEvent
from policy.store import Store

from .spend_voids import VoidsFailed, apply_voids


def _to_json(e: AuditEvent) -> str:
    return json.dumps({"kind": e.kind, "actor": e.actor, "at": e.at.isoformat(), "request_id": e.request_id,
                       "service": e.service, "method": e.method, "outcome": e.outcome, "reason": e.reason,
                       "detail": e.detail, "trace_id": e.trace_id, "id": e.id})


def _from_json(text: str) -> AuditEvent:
    d: dict[str, Any] = json.loads(text)
    d["at"] = datetime.fromisoformat(d["at"])
    return AuditEvent(**d)


class AuditSpool:
    """A bounded, fsync'd local queue of audit events (safe across threads and restarts)."""

    def __init__(self, path: str, max_events: int, *, fsync: bool = True) -> None:
        """``fsync=False``: commits are not fsync'd (WAL, synchronous=NORMAL); what ``put``
        returned survives the process being killed, not the host crashing."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.path, self.max_events, self.fsync = path, max_events, fsync
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("CREATE TABLE IF NOT EXISTS audit_spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "id TEXT NOT NULL UNIQUE, event TEXT NOT NULL, spooled_at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS spend_voids (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "decision_id TEXT NOT NULL UNIQUE, spooled_at REAL NOT NULL)")
        except sqlite3.Error as e:
            raise OSError(f"cannot open the audit spool {path}: {e}") from None

    def put(self, events: Sequence[AuditEvent], voids: Sequence[str] = ()) -> int:
        """Keep ``events`` and the spend ``voids`` (decision ids) durably, in one transaction,
        before returning; returns how many events fitted under the bound (voids are never
        dropped: each is one short row, and dropping one could leave a use spent for a call
        that was refused)."""
        now = time.time()
        with self._lock:
            room = self.max_events - self._depth()
            kept = list(events)[:max(0, room)]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO audit_spool (id, event, spooled_at) VALUES (?, ?, ?)",
                                     [(e.id, _to_json(e), now) for e in kept])
                if voids:
                    self._db.executemany("INSERT OR IGNORE INTO spend_voids (decision_id, spooled_at) "
                                         "VALUES (?, ?)", [(d, now) for d in voids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(kept)

    def oldest(self, limit: int) -> list[AuditEvent]:
        with self._lock:
            rows = self._db.execute("SELECT event FROM audit_spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [_from_json(r[0]) for r in rows]

    def remove(self, ids: Sequence[str]) -> None:
        """Forget ``ids`` (written to the store): one transaction, one fsync."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM audit_spool WHERE id = ?", [(i,) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def voids(self, limit: int) -> list[str]:
        """The oldest spend voids not yet applied to the store (decision ids)."""
        with self._lock:
            rows = self._db.execute("SELECT decision_id FROM spend_voids ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
        return [str(r[0]) for r in rows]

    def remove_voids(self, decision_ids: Sequence[str]) -> None:
        """Forget voids the store has applied (one transaction)."""
        if not decision_ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM spend_voids WHERE decision_id = ?", [(d,) for d in decision_ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _depth(self) -> int:
        """At least the number of events held, read from the rowid range in O(log n) (a
        COUNT(*) would scan a deep spool on every group commit while the store is away).
        Events leave oldest first, so the range has few gaps; a gap only makes the bound
        bite a little early."""
        low, high = self._db.execute("SELECT (SELECT MIN(seq) FROM audit_spool), "
                                     "(SELECT MAX(seq) FROM audit_spool)").fetchone()
        return 0 if low is None else int(high) - int(low) + 1

    def stats(self) -> dict[str, float]:
        """``depth`` (events waiting), ``age_seconds`` of the oldest one (0 when empty) and
        ``spend_voids`` (voids not yet applied to the store)."""
        with self._lock:
            depth, oldest = self._db.execute("SELECT COUNT(*), MIN(spooled_at) FROM audit_spool").fetchone()
            voids = self._db.execute("SELECT COUNT(*) FROM spend_voids").fetchone()[0]
        return {"depth": float(depth), "age_seconds": time.time() - oldest if oldest is not None else 0.0,
                "spend_voids": float(voids)}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ship(self, store: Store, batch: int,
             on_batch: Callable[[int], None] | None = None) -> int:
        """Write every spooled event to ``store``, oldest first, ``batch`` per transaction,
        removing each batch only after the store took it (blocking), then applies the spend
        voids the same way. Returns how many events were shipped. The store ignores event ids it
        already holds and voids are idempotent, so a ship cut short between the store's commit
        and the removal here writes nothing twice when it runs again."""
        done = 0
        while events := self.oldest(batch):
            write = getattr(store, "append_audits", None)
            if write is not None:
                write(events)
            else:
                for e in events:
                    store.append_audit(e)
            self.remove([e.id for e in events])
            done += len(events)
            if on_batch is not None:
                on_batch(len(events))
        while pending := self.voids(batch):
            try:
                applied = apply_voids(store, pending)
            except VoidsFailed as failed:
                self.remove_voids(failed.done)
                raise failed.cause from None
            self.remove_voids(applied)
        return done


__all__ = ["AuditSpool"]
