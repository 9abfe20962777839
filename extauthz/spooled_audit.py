"""Decision audit events made durable before the check is answered (issue 9, finding 4).

With a spool (``audit.spool_path``, on by default) the writer works spool first:

1. ``submit`` puts the event in a small in-memory group; ``acknowledged`` (awaited by the
   check before it answers) resolves once that group is in the local SQLite spool, one
   fsync'd transaction for every event that arrived meanwhile (group commit: under load one
   fsync serves many checks, alone it costs one fsync).
2. A shipper writes the oldest spooled events to the store in batches (after
   ``batch_window`` for company) and only then removes them from the spool. The store
   ignores an event id it already holds, so a crash between its commit and the removal
   writes nothing twice; events spooled before a kill -9 are shipped by the next start.

Batches that arrive already encoded (the fast path's access log, ``write_rows``) go straight
to the store instead, in one transaction whose commit is their durability, while the store
answers within ``direct_timeout``: no spool write, no ship. A store that fails or is slow sends
that batch, and every batch after it, through the spool as above until the shipper has
shipped spooled events again with every store transaction within ``direct_timeout`` (a
store that answers, but slowly, keeps the spool): the spool is the fallback, never skipped
for a batch the store did not take. ``rpcauthz_fast_path_audit_writes_total{path}`` counts
the events each way. A direct write that timed out may still commit later; the spool's copy is
then ignored by the store (same id), so nothing is written twice.

So a kill -9 loses no event whose check was answered, and a store outage only makes the
spool deeper (``rpcauthz_audit_spool_stat``). Writing still never changes a decision: a
full group (``queue_size``) or a full spool drops and counts the event
(``rpcauthz_audit_dropped_total``), and a spool slower than ``ack_timeout`` lets the check
answer anyway (logged).

The spool is written from a thread of its own, never from the executor shared with the
store's calls: in a store outage those calls hold the shared threads (each until the store
or its timeout answers) and queue behind one another, and the spool, the outage's one way
to durability, must not wait in that queue.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from policy.audit import AuditEvent
from policy.store import Store

from .audit_spool import MAX_BATCH, AuditSpool, write_rows
from .metrics import Metrics
from .spend_voids import SpendIntent, SpendSettled, SpendVoid

log = logging.getLogger("extauthz.audit")

#: Deferred events built between two GIL hand-backs (see audit_writer.BUILD_CHUNK).
BUILD_CHUNK = 16
#: How the log line of a check answered before its audit event was spooled begins (the
#: fault suite counts these).
LATE_ACK_LOG = "audit spool slower than"


class _Rows(list[tuple[str, str]]):
    """Events already encoded for the spool, as (id, ``audit_spool.event_json`` text)."""

    __slots__ = ()


class _RetryableRows(_Rows):
    """``_Rows`` whose sender offers them again if they are not spooled (not lost then):
    kept out whole when the spool has no room for them all. ``taken`` is their own answer
    (the group's answers the group's other items: a Check's spend intent must not fail
    because the audit file's rows did not fit)."""

    __slots__ = ("taken",)

    def __init__(self, rows: list[tuple[str, str]], taken: asyncio.Future[bool]) -> None:
        super().__init__(rows)
        self.taken = taken


_Queued = AuditEvent | Callable[[], AuditEvent] | SpendVoid | SpendIntent | SpendSettled | _Rows


class SpooledAuditWriter:
    """Spool first (fsync'd, group commit), then ship from the spool to the store."""

    def __init__(self, store: Store, metrics: Metrics, spool: AuditSpool, queue_size: int,
                 executor: Executor | None = None, batch_window: float = 0.0,
                 replay_interval: float = 1.0, ack_timeout: float = 1.0,
                 direct_timeout: float | None = None) -> None:
        """``executor`` runs the store's calls (direct writes, the ship); the spool's writes run
        in a thread of the writer's own. ``direct_timeout``: how long ``write_rows`` waits for
        the store before it spools the batch instead (default ``ack_timeout``; 0 always spools)."""
        if batch_window < 0:
            raise ValueError(f"batch_window must be >= 0 seconds, not {batch_window}")
        self._store, self._metrics, self.spool = store, metrics, spool
        self._queue_size = queue_size
        self._executor = executor
        self._spool_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-spool")
        self._window, self._replay_interval, self._ack_timeout = batch_window, replay_interval, ack_timeout
        self._direct_timeout = ack_timeout if direct_timeout is None else direct_timeout
        #: Whether ``write_rows`` goes to the store: off from a failed or slow direct write (or
        #: ship) until the next successful ship.
        self._direct = self._direct_timeout > 0
        self._group: list[_Queued] = []
        #: Events in the group (a batch of rows counts each row), bounded by queue_size.
        self._queued = 0
        #: Resolves when the group is written: True, or False if the spool write failed.
        self._group_done: asyncio.Future[bool] | None = None
        self._wake_spooler = asyncio.Event()
        self._wake_shipper = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._unspooled_voids: list[str] = []
        self._unspooled_settled: list[str] = []

    def start(self) -> None:
        """Claim this process's spend intents, turn those a killed process left into voids
        (``spend_voids.py``), then start spooling and shipping."""
        self.spool.claim_intents()
        orphaned = self.spool.void_orphaned_intents()
        if orphaned:
            log.warning("%d approval spend(s) of a previous process were never answered allow: "
                        "voided (the uses are given back once the store answers)", orphaned)
        self._tasks = [asyncio.create_task(self._spooler(), name="audit-spooler"),
                       asyncio.create_task(self._shipper(), name="audit-shipper")]

    def submit(self, event: _Queued) -> None:
        """Add ``event`` to the group being spooled; never blocks, never raises for a full group.

        ``event`` may be a function that builds it (called in the spooler's thread)."""
        if self._queued >= self._queue_size:
            self._metrics.audit_dropped.labels("queue_full").inc()
            log.error("audit queue full: dropped an event")
            return
        self._join(event)

    def submit_rows(self, rows: list[tuple[str, str]]) -> None:
        """``submit`` for many events already encoded as spool rows (id, ``event_json`` text):
        one item in the group, one ``executemany`` in its transaction. Rows past ``queue_size``
        are dropped and counted, as ``submit``'s events are."""
        room = self._queue_size - self._queued
        if len(rows) > room:
            dropped = len(rows) - max(0, room)
            self._metrics.audit_dropped.labels("queue_full").inc(dropped)
            log.error("audit queue full: dropped %d event(s)", dropped)
            rows = rows[:max(0, room)]
        if rows:
            self._join(_Rows(rows), len(rows))

    @property
    def wants_columns(self) -> bool:
        """Whether ``write_rows`` would now write straight to a store that takes the events'
        column values (``append_audit_rows``: SQLite, which would decode the JSON in this process)."""
        return self._direct and not self._closing and hasattr(self._store, "append_audit_rows")

    async def write_rows(self, rows: list[tuple[str, str]], columns: list[tuple[Any, ...]] | None = None,
                         *, retryable: bool = False) -> None:
        """Make ``rows`` (id, ``event_json`` text) durable, then return: one store transaction
        while the store answers within ``direct_timeout`` (its commit is the durability), else
        ``submit_rows`` and ``acknowledged`` (the spool, fsync'd; counted and dropped past
        ``queue_size`` as there). ``columns``: the same events as their store columns, one per
        row in order (``policy.stores.sqlite.audit_row``), written instead of the JSON where the
        store takes them (``wants_columns``).

        ``retryable``: for a caller that can offer the rows again (the audit file's tailer):
        through the spool, wait for the write however long it takes, and raise ``OSError``
        instead of dropping them when the group is full, the spool has no room for them all
        (``spool_max_events``) or the spool write fails."""
        if not rows:
            return
        if self._direct and not self._closing:
            loop = asyncio.get_running_loop()
            as_rows = getattr(self._store, "append_audit_rows", None)
            if columns is not None and as_rows is not None:
                if len(columns) != len(rows):
                    raise ValueError(f"{len(columns)} column rows for {len(rows)} events")
                write = loop.run_in_executor(self._executor, as_rows, columns)
            else:
                write = loop.run_in_executor(self._executor, write_rows, self._store,
                                             [text for _id, text in rows])
            try:
                async with asyncio.timeout(self._direct_timeout):
                    await asyncio.shield(write)
                self._metrics.fast_path_audit_writes.labels("direct").inc(len(rows))
                return
            except TimeoutError:
                # Still running in its thread: if it commits, the spool's copy is ignored (same ids).
                write.add_done_callback(lambda f: f.cancelled() or f.exception())
                why = f"no answer within {self._direct_timeout:.2f}s"
            except Exception as e:
                why = str(e) or type(e).__name__
            self._direct = False
            self._metrics.store_errors.labels("append_audit").inc()
            log.warning("the store did not take %d fast-path audit event(s) (%s): they and the next "
                        "ones go through the local spool until the store answers again", len(rows), why)
        # Retryable rows that could never fit the queue go as any others (the bound drops the
        # rest, counted): offered again, they would wait for ever.
        if retryable and len(rows) <= self._queue_size:
            if len(rows) > self._queue_size - self._queued:
                raise OSError(f"the audit queue has no room for {len(rows)} event(s) now")
            item = _RetryableRows(rows, asyncio.get_running_loop().create_future())
            self._join(item, len(rows))
            if not await asyncio.shield(item.taken):
                raise OSError(f"the audit spool could not write {len(rows)} event(s) (it is full, or its write failed)")
            self._metrics.fast_path_audit_writes.labels("spool").inc(len(rows))
            return
        self._metrics.fast_path_audit_writes.labels("spool").inc(len(rows))  # (any dropped: audit_dropped too)
        self.submit_rows(rows)
        await self.acknowledged()

    def void_spend(self, decision_id: str) -> None:
        """The check ``decision_id`` attempted to spend an approval use and was not allowed:
        spool a void (with this group, so durable before the check is answered) that the
        shipper applies to the store (``spend_voids.py``). Never dropped for a full group."""
        self._join(SpendVoid(decision_id))

    async def intend_spend(self, decision_id: str) -> None:
        """Before the check ``decision_id`` sends a spend to the store: record the intent
        durably (with the group being spooled, fsync'd) and return once it is on disk. Raises
        ``OSError`` if the spool could not write it: the check must then not spend. An intent
        neither settled (``settle_spend``) nor voided by its process becomes a void when that
        process is gone (``AuditSpool.void_orphaned_intents``)."""
        done = self._join(SpendIntent(decision_id))
        if not await asyncio.shield(done):
            raise OSError(f"the audit spool could not record the spend intent of decision {decision_id}")

    def settle_spend(self, decision_id: str) -> None:
        """The check ``decision_id`` is answered allow: forget its spend intent in the same
        spool transaction as its allow events (no fsync of its own). Never dropped."""
        self._join(SpendSettled(decision_id))

    def _join(self, item: _Queued, size: int = 1) -> asyncio.Future[bool]:
        self._group.append(item)
        self._queued += size
        if self._group_done is None:
            self._group_done = asyncio.get_running_loop().create_future()
        self._wake_spooler.set()
        return self._group_done

    async def acknowledged(self) -> None:
        """Wait (at most ``ack_timeout``) until every event submitted so far is in the spool."""
        done = self._group_done
        if done is None:
            return
        try:
            async with asyncio.timeout(self._ack_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            log.error("%s %.1fs: answering before the event is durable", LATE_ACK_LOG, self._ack_timeout)

    async def _spooler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake_spooler.wait()
            self._wake_spooler.clear()
            group, done = self._group, self._group_done
            self._group, self._group_done, self._queued = [], None, 0
            if not group:
                continue
            written = retryable_taken = False
            try:
                retryable_taken = await loop.run_in_executor(self._spool_thread, self._put, group)
                written = True
            except Exception as e:
                # Rows their sender offers again (the audit file's) are not lost.
                lost = sum(0 if isinstance(i, _RetryableRows) else len(i) if isinstance(i, _Rows) else 1
                           for i in group)
                if lost:
                    self._metrics.audit_dropped.labels("spool_failed").inc(lost)
                    log.error("audit spool write failed: dropped %d event(s): %s", lost, e)
                else:
                    log.warning("audit spool write failed (its events will be offered again): %s", e)
            finally:
                if done is not None and not done.done():
                    done.set_result(written)
                for item in group:
                    if isinstance(item, _RetryableRows) and not item.taken.done():
                        item.taken.set_result(retryable_taken)
            self._wake_shipper.set()

    def _put(self, group: list[_Queued]) -> bool:
        """In the executor: build the deferred events, then spool them in one transaction.
        False when the spool had no room for the group's retryable rows (kept out whole, not
        dropped: their sender offers them again)."""
        events: list[AuditEvent] = []
        voids: list[str] = []
        intents: list[str] = []
        settled: list[str] = []
        rows: list[tuple[str, str]] = []
        retryable: list[tuple[str, str]] = []
        for n, item in enumerate(group):
            if isinstance(item, _Rows):
                # Retryable rows that could never all fit are spooled as far as the bound
                # allows, as any others: offered again, they would wait for ever.
                whole = isinstance(item, _RetryableRows) and len(item) <= self.spool.max_events
                (retryable if whole else rows).extend(item)
                continue
            if isinstance(item, AuditEvent):
                events.append(item)
                continue
            if isinstance(item, SpendVoid):
                voids.append(item.decision_id)
                continue
            if isinstance(item, SpendIntent):
                intents.append(item.decision_id)
                continue
            if isinstance(item, SpendSettled):
                settled.append(item.decision_id)
                continue
            if n % BUILD_CHUNK == 0:
                time.sleep(0)  # hand the GIL to a waiting check
            try:
                events.append(item())
            except Exception:  # a bug building one event must not lose the others
                self._metrics.audit_dropped.labels("build_failed").inc()
                log.exception("could not build an audit event")
        voids = self._unspooled_voids + voids
        settled = self._unspooled_settled + settled
        if not (events or voids or intents or settled or rows or retryable):
            return True
        try:
            kept = self.spool.put(events, voids, intents=intents, settled=settled, rows=rows, whole_rows=retryable)
        except Exception:
            # Retried with the next group, never dropped. (A failed intent is not: its
            # check does not spend, and it voids its decision instead.)
            self._unspooled_voids, self._unspooled_settled = voids, settled
            raise
        self._unspooled_voids, self._unspooled_settled = [], []
        others = len(events) + len(rows)
        if kept < others:
            lost = others - kept
            self._metrics.audit_dropped.labels("spool_full").inc(lost)
            log.error("audit spool full (%d events): dropped %d event(s)", self.spool.max_events, lost)
        if retryable and kept < others + len(retryable):
            log.warning("audit spool full (%d events): %d event(s) of the audit file wait in the file",
                        self.spool.max_events, len(retryable))
            return False
        return True

    async def _shipper(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that races with its timeout, and close() would then wait for ever.
                async with asyncio.timeout(self._replay_interval):
                    await self._wake_shipper.wait()
                if self._window and not self._closing:
                    await asyncio.sleep(self._window)  # let more events join this batch
            except TimeoutError:
                pass
            self._wake_shipper.clear()
            try:
                shipped, slowest = await loop.run_in_executor(self._executor, self._ship_timed)
            except Exception as e:  # the store is away: the events wait in the spool
                self._direct = False
                self._metrics.store_errors.labels("append_audit").inc()
                log.warning("audit events wait in the local spool for the store: %s", e)
            else:
                # Only a store seen taking events within direct_timeout gets the direct write
                # back: a ship of nothing proves nothing, and a store that answers but slower
                # would cost every batch the full wait before it falls back again.
                if (not self._direct and self._direct_timeout > 0 and shipped
                        and slowest <= self._direct_timeout):
                    log.info("the store answers again: fast-path audit events go straight to it")
                    self._direct = True

    def replay_once(self) -> int:
        """Ship everything spooled (blocking); returns how many events reached the store."""
        return self._ship_timed()[0]

    def _ship_timed(self) -> tuple[int, float]:
        """``replay_once``, and the longest one store transaction of it took (seconds)."""
        slowest, last = 0.0, time.monotonic()

        def batch(_n: int) -> None:
            nonlocal slowest, last
            now = time.monotonic()
            slowest, last = max(slowest, now - last), now
        shipped = self.spool.ship(self._store, MAX_BATCH, on_batch=batch,
                                  on_given_back=self._metrics.approval_uses_given_back.inc)
        return shipped, slowest

    async def close(self, timeout: float = 5.0) -> None:
        """Spool what is pending, ship what the store takes within ``timeout``, then stop.

        What the store does not take stays in the spool for the next start."""
        if not self._tasks:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        self._wake_spooler.set()
        await self.acknowledged()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, self.replay_once), timeout)
        except Exception as e:
            log.warning("audit writer stopped with %d event(s) in the spool (shipped at the next start): %s",
                        int(self.spool.stats()["depth"]), e or type(e).__name__)
        for t in self._tasks:
            t.cancel()
        _done, stuck = await asyncio.wait(self._tasks, timeout=2.0)
        if stuck:
            log.error("audit writer: %d task(s) did not stop; the spool keeps their events", len(stuck))
        self._tasks = []
        self._spool_thread.shutdown(wait=False)


__all__ = ["LATE_ACK_LOG", "SpooledAuditWriter"]
