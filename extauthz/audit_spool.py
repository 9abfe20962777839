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

Each event is kept as one JSON row (``event_json``: ``at`` first, in UTC with microseconds,
``detail`` encoded as the SQL stores encode it); callers with many events encode them
themselves and pass ``put(rows=...)`` (the fast path's access log does, when the store does
not take them directly: ``SpooledAuditWriter.write_rows``). ``ship`` hands such
rows to a store with ``append_audit_json`` as they are (the database decodes them); rows an
older version wrote are decoded into events and shipped as before.

And *spend intents*: before a check sends a spend to the store it records an intent for its
decision id (fsync'd, ``put(intents=...)``); the check's allow events settle it in their own
transaction (``put(settled=...)``), a void settles it too. An intent left unsettled by a
process that died (kill -9 between the spend's commit and the answer) becomes a void: each
process marks its intents with an *owner* token and holds an exclusive ``flock`` on
``<spool>.intents-<owner>.lock`` while it lives (``claim_intents``); ``void_orphaned_intents``
turns the intents of every owner whose lock is free (or gone) into voids, so even a spool shared
by several processes never voids a live process's spend, and removes the lock files of owners
that are gone (``claim_intents`` re-checks its file after locking, so a removal cannot race it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from policy.audit import AuditEvent
from policy.store import Store
from policy.stores.sqlite import sqlite_problem

from .spend_voids import VoidsFailed, apply_voids

#: Most events written to the store in one transaction (by the writer and by ``ship``).
MAX_BATCH = 500
#: ``AuditSpool._oldest``'s read: [[seq, event], ...] of the oldest ``?`` events (sorted there:
#: an aggregate's order is not promised).
_OLDEST_AS_JSON = ("SELECT json_group_array(json_array(seq, event)) FROM "
                   "(SELECT seq, event FROM audit_spool ORDER BY seq LIMIT ?)")


#: The spool's JSON: compact, keys sorted (so ``detail`` is encoded exactly as the SQL stores
#: encode it), ``at`` first (see ``event_json``); strict, so the database's JSON reads it.
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
_ENCODE_LAX = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def event_json(e: AuditEvent) -> str:
    """``e`` as a spool row. An aware ``at`` is written first, in UTC with microseconds
    (``{"at":"YYYY-MM-DDTHH:MM:SS.ffffff+00:00",...``): ``is_canonical`` tells such a row from
    one an older version wrote, and the store takes it as it is (``Store.append_audit_json``)."""
    d = {"kind": e.kind, "actor": e.actor, "request_id": e.request_id, "service": e.service,
         "method": e.method, "outcome": e.outcome, "reason": e.reason, "detail": e.detail,
         "trace_id": e.trace_id, "id": e.id}
    if e.at.tzinfo is not None:
        at = e.at.astimezone(UTC).isoformat(timespec="microseconds")
        try:
            return f'{{"at":"{at}",{_ENCODE(d)[1:]}'
        except ValueError:
            pass  # NaN or infinity in detail: not JSON to a database, so not canonical
    # Not canonical: shipped as a decoded event (a naive ``at`` is refused by the store, as before).
    d["at"] = e.at.isoformat()
    return _ENCODE_LAX(d)


def is_canonical(row: str) -> bool:
    """Whether ``row`` has ``event_json``'s canonical ``at`` (older spools hold other rows)."""
    return row.startswith('{"at":"') and row[26:27] == "." and row[33:41] == '+00:00",'


def event_from_json(text: str) -> AuditEvent:
    """The event a spool row holds (any form ``event_json`` ever wrote)."""
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
        problem = sqlite_problem()
        if problem is not None:
            raise OSError(f"cannot open the audit spool {path}: {problem}")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("CREATE TABLE IF NOT EXISTS audit_spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "id TEXT NOT NULL UNIQUE, event TEXT NOT NULL, spooled_at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS spend_voids (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "decision_id TEXT NOT NULL UNIQUE, spooled_at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS spend_intents (decision_id TEXT PRIMARY KEY, "
                             "owner TEXT NOT NULL, spooled_at REAL NOT NULL)")
        except sqlite3.Error as e:
            raise OSError(f"cannot open the audit spool {path}: {e}") from None
        #: This process's intents' owner token and its held lock (``claim_intents``).
        self.owner: str | None = None
        self._owner_lock: int | None = None

    def _lock_path(self, owner: str) -> str:
        return f"{self.path}.intents-{owner}.lock"

    def claim_intents(self) -> str:
        """Take an owner token for this spool's spend intents and hold its lock while this
        object lives (idempotent); returns the token."""
        if self.owner is not None:
            return self.owner
        owner = os.urandom(8).hex()
        path = self._lock_path(owner)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Another process's sweep (void_orphaned_intents) may have locked and removed
                # the file between our open and flock; a lock on a removed file guards nothing.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            except OSError:
                os.close(fd)
                raise
            os.close(fd)
        self.owner, self._owner_lock = owner, fd
        return owner

    def void_orphaned_intents(self) -> int:
        """Turn every spend intent of an owner that is gone (its lock free or missing) into a
        void, in one transaction per owner; returns how many. Never touches this object's own
        intents, nor those of a live process sharing the spool."""
        with self._lock:
            owners = [str(r[0]) for r in self._db.execute(
                "SELECT DISTINCT owner FROM spend_intents WHERE owner != ?", (self.owner or "",)).fetchall()]
        turned = 0
        for owner in owners:
            path = self._lock_path(owner)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd = None  # its owner closed (or it was removed): nobody holds it
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live process: its intents are its own to settle
                turned += self._intents_to_voids(owner)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            finally:
                if fd is not None:
                    os.close(fd)
        self._remove_stale_locks()
        return turned

    def _remove_stale_locks(self) -> None:
        """Remove the lock files of owners that are gone and left no intents (a process that
        died with none open), so they do not pile up beside the spool."""
        prefix = os.path.basename(f"{self.path}.intents-")
        folder = os.path.dirname(os.path.abspath(self.path))
        for name in os.listdir(folder):
            if not (name.startswith(prefix) and name.endswith(".lock")):
                continue
            path = os.path.join(folder, name)
            if self.owner is not None and path == os.path.abspath(self._lock_path(self.owner)):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # held: a live process
            try:
                owner = name[len(prefix):-len(".lock")]
                with self._lock:
                    left = self._db.execute("SELECT 1 FROM spend_intents WHERE owner = ? LIMIT 1",
                                            (owner,)).fetchone()
                if left is None:  # an owner with intents is voided first (above), never here
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            finally:
                os.close(fd)

    def _intents_to_voids(self, owner: str) -> int:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [str(r[0]) for r in self._db.execute(
                    "SELECT decision_id FROM spend_intents WHERE owner = ?", (owner,)).fetchall()]
                self._db.executemany("INSERT OR IGNORE INTO spend_voids (decision_id, spooled_at) VALUES (?, ?)",
                                     [(d, now) for d in ids])
                self._db.execute("DELETE FROM spend_intents WHERE owner = ?", (owner,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(ids)

    def put(self, events: Sequence[AuditEvent], voids: Sequence[str] = (), *,
            intents: Sequence[str] = (), settled: Sequence[str] = (),
            rows: Sequence[tuple[str, str]] = (), whole_rows: Sequence[tuple[str, str]] = ()) -> int:
        """Keep ``events`` and the spend ``voids`` (decision ids) durably, in one transaction,
        before returning; returns how many events fitted under the bound (voids are never
        dropped: each is one short row, and dropping one could leave a use spent for a call
        that was refused). In the same transaction: records the spend ``intents`` (decision
        ids, owned by ``claim_intents``'s token, which they require) and forgets the intents of
        ``settled`` decisions and of the voids (a void settles its decision's intent).
        ``rows``: more events, already encoded, as (id, ``event_json`` text); they count in the
        bound and the return value after ``events``. ``whole_rows``: more such rows, kept all
        or none (after the others; none if they do not all fit): for a sender that offers rows
        it could not spool again (the audit file's tailer), so the bound never drops them."""
        if intents and self.owner is None:
            raise ValueError("spend intents need an owner: call claim_intents() first")
        now = time.time()
        with self._lock:
            room = max(0, self.max_events - self._depth())
            kept = [(e.id, event_json(e), now) for e in events[:room]]
            if rows:
                kept.extend((i, text, now) for i, text in rows[:max(0, room - len(kept))])
            if whole_rows and len(kept) + len(whole_rows) <= room:
                kept.extend((i, text, now) for i, text in whole_rows)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO audit_spool (id, event, spooled_at) VALUES (?, ?, ?)",
                                     kept)
                if voids:
                    self._db.executemany("INSERT OR IGNORE INTO spend_voids (decision_id, spooled_at) "
                                         "VALUES (?, ?)", [(d, now) for d in voids])
                if intents:
                    self._db.executemany("INSERT OR IGNORE INTO spend_intents (decision_id, owner, spooled_at) "
                                         "VALUES (?, ?, ?)", [(d, self.owner, now) for d in intents])
                if settled or voids:
                    self._db.executemany("DELETE FROM spend_intents WHERE decision_id = ?",
                                         [(d,) for d in (*settled, *voids)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(kept)

    def oldest(self, limit: int) -> list[AuditEvent]:
        return [event_from_json(text) for _seq, text in self._oldest(limit)]

    def _oldest(self, limit: int) -> list[tuple[int, str]]:
        """The oldest ``limit`` events as (seq, spool row), by seq.

        Read as one JSON array (one statement step): Python's sqlite3 lets go of the
        interpreter lock around every step, and while the server's other threads keep it busy
        each row's step waited for it again (shipping 5,000 spooled events beside a busy
        thread took 77 s, so a busy server's spool could fill faster than it drained)."""
        with self._lock:
            text = self._db.execute(_OLDEST_AS_JSON, (limit,)).fetchone()[0]
        return sorted((int(seq), event) for seq, event in json.loads(text or "[]"))

    def _remove_seqs(self, low: int, high: int) -> None:
        """Forget the events ``_oldest`` gave from ``low`` to ``high``: every row in that range
        was among them (seq only grows: AUTOINCREMENT never reuses one)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM audit_spool WHERE seq BETWEEN ? AND ?", (low, high))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
            intents = self._db.execute("SELECT COUNT(*) FROM spend_intents").fetchone()[0]
        return {"depth": float(depth), "age_seconds": time.time() - oldest if oldest is not None else 0.0,
                "spend_voids": float(voids), "spend_intents": float(intents)}

    def close(self) -> None:
        """Close the spool; this object's unsettled intents (if any) become voids at the next
        ``void_orphaned_intents`` of any process on this spool."""
        with self._lock:
            self._db.close()
        if self._owner_lock is not None and self.owner is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path(self.owner))
            os.close(self._owner_lock)
            self._owner_lock = None

    def ship(self, store: Store, batch: int, on_batch: Callable[[int], None] | None = None,
             on_given_back: Callable[[], None] | None = None) -> int:
        """Write every spooled event to ``store``, oldest first, ``batch`` per transaction,
        removing each batch only after the store took it (blocking), then applies the spend
        voids the same way. Returns how many events were shipped. The store ignores event ids it
        already holds and voids are idempotent, so a ship cut short between the store's commit
        and the removal here writes nothing twice when it runs again. Spend intents of dead
        owners become voids first (``void_orphaned_intents``)."""
        self.void_orphaned_intents()
        done = 0
        while rows := self._oldest(batch):
            write_rows(store, [text for _seq, text in rows])
            self._remove_seqs(rows[0][0], rows[-1][0])
            done += len(rows)
            if on_batch is not None:
                on_batch(len(rows))
        while pending := self.voids(batch):
            try:
                applied = apply_voids(store, pending, on_given_back)
            except VoidsFailed as failed:
                self.remove_voids(failed.done)
                raise failed.cause from None
            self.remove_voids(applied)
        return done


def write_rows(store: Store, rows: Sequence[str]) -> None:
    """Spool rows (``event_json`` texts) into ``store`` in one transaction: as they are where
    the store takes them (``append_audit_json``) and every row is canonical, else decoded into
    events. Raises what the store raises."""
    as_json = getattr(store, "append_audit_json", None)
    if as_json is not None and all(map(is_canonical, rows)):
        as_json(rows)
        return
    events = [event_from_json(text) for text in rows]
    write = getattr(store, "append_audits", None)
    if write is not None:
        write(events)
    else:
        for e in events:
            store.append_audit(e)


__all__ = ["AuditSpool", "event_from_json", "event_json", "is_canonical", "write_rows"]
