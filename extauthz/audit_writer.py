"""Decision audit events, written to the store in the background.

Writing never blocks or changes a decision: ``submit`` only enqueues; a full queue drops the
event and counts it in ``rpcauthz_audit_dropped``. A batch the store refuses goes to the local
``AuditSpool`` (``audit.spool_path``) and is replayed once the store answers, exactly once
(the store ignores event ids it holds); without a spool it is dropped and counted. The writer
waits ``batch_window`` seconds after the first event of a batch and then writes everything
queued (up to ``MAX_BATCH``) in one transaction (``append_audits``), so a busy gateway pays
one commit per window instead of one per decision. (The use an allow spends is recorded by
the store in the decision path, ``Store.spend_use``; spend voids, ``spend_voids.py``, are
applied from here: in memory without a spool, so a kill -9 loses them.)
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from policy.audit import AuditEvent
from policy.store import Store

from .audit_spool import MAX_BATCH, AuditSpool
from .metrics import Metrics
from .spend_voids import VoidsFailed, apply_voids
from .tasks import cancel_and_wait

log = logging.getLogger("extauthz.audit")

#: What the queue holds: an event, or a function that builds it in the writer's thread.
_Queued = AuditEvent | Callable[[], AuditEvent]


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(item: AuditEvent | Callable[[], AuditEvent]) -> str:
    if isinstance(item, AuditEvent):
        return f"{item.kind} {item.id} for {item.actor}"
    return "a deferred event"

class _WriteFailed(Exception):
    """The store refused a batch; ``events`` are the built events to keep."""

    def __init__(self, events: list[AuditEvent], cause: Exception) -> None:
        super().__init__(str(cause))
        self.events, self.cause = events, cause


#: Deferred events the writer's thread builds between two GIL hand-backs. Building is pure
#: Python and holds the GIL; a check that arrives meanwhile would otherwise wait up to the
#: interpreter's switch interval (5 ms) for it, which showed up as the c=1 p99.
BUILD_CHUNK = 16


class AuditWriter:
    """Queue of audit events and the task that writes them in batches."""

    def __init__(self, store: Store, metrics: Metrics, queue_size: int, executor: Executor | None = None,
                 batch_window: float = 0.0, spool: AuditSpool | None = None,
                 replay_interval: float = 1.0) -> None:
        if batch_window < 0:
            raise ValueError(f"batch_window must be >= 0 seconds, not {batch_window}")
        self._store = store
        self._metrics = metrics
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=queue_size)
        self._executor = executor
        self._window = batch_window
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._window_over: asyncio.Future[None] | None = None
        #: Where events go when the store cannot take them (None: they are dropped).
        self.spool = spool
        self._replay_interval = replay_interval
        self._replay_task: asyncio.Task[None] | None = None
        #: Spend voids (``spend_voids.py``) not yet applied; in memory without a spool.
        self._voids: list[str] = []
        self._voids_lock = threading.Lock()
        self._voids_task: asyncio.Task[None] | None = None
        self._wake_voids = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._voids_task = asyncio.create_task(self._apply_voids_loop(), name="audit-spend-voids")
        if self.spool is not None:
            self._replay_task = asyncio.create_task(self._replay(), name="audit-replay")

    def submit(self, event: AuditEvent | Callable[[], AuditEvent]) -> None:
        """Queue ``event`` for writing; never blocks, never raises for a full queue.

        ``event`` may also be a function that builds it: it is called in the writer's
        thread just before the write, which keeps building it off the decision's path.
        """
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.audit_dropped.labels("queue_full").inc()
            log.error("audit queue full: dropped %s", _describe(event))

    def void_spend(self, decision_id: str) -> None:
        """The check ``decision_id`` attempted to spend an approval use and was not allowed:
        give the use back once the store answers (``spend_voids.py``). With a spool the void is
        kept there (durably, though not before the check answers); without one, in memory."""
        with self._voids_lock:
            self._voids.append(decision_id)
        self._wake_voids.set()

    async def _apply_voids_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self._replay_interval):
                    await self._wake_voids.wait()
            except TimeoutError:
                pass
            self._wake_voids.clear()
            try:
                await loop.run_in_executor(self._executor, self.apply_voids_once)
            except Exception as e:  # the store is away: the voids wait
                log.warning("spend voids wait for the store: %s", e)

    def apply_voids_once(self) -> None:
        """Apply (or spool) the pending voids (blocking); raises the store's error if it fails."""
        with self._voids_lock:
            pending, self._voids = self._voids, []
        if not pending:
            return
        try:
            if self.spool is not None:
                self.spool.put([], pending)
                pending = []
                self.replay_once()
            else:
                apply_voids(self._store, pending, self._metrics.approval_uses_given_back.inc)
        except VoidsFailed as failed:
            with self._voids_lock:
                self._voids[:0] = [d for d in pending if d not in failed.done]
            raise failed.cause from None
        except Exception:
            with self._voids_lock:
                self._voids[:0] = pending
            raise

    async def intend_spend(self, decision_id: str) -> None:
        """Nothing recorded: without a spool first, a kill -9 between a spend's commit and its
        answer leaves the use spent (see SpooledAuditWriter.intend_spend)."""

    def settle_spend(self, decision_id: str) -> None:
        """Nothing to settle without a spool first (see ``intend_spend``)."""

    async def acknowledged(self) -> None:
        """Nothing to wait for: without a spool first, events wait in memory (see SpooledAuditWriter)."""

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # Everything queued meanwhile goes in one transaction when the store can batch.
            batch_write = getattr(self._store, "append_audits", None)
            if batch_write is not None:
                if self._window and not self._closing and self._queue.qsize() < MAX_BATCH - 1:
                    await self._wait_window(loop)
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
            try:
                if batch_write is not None:
                    await loop.run_in_executor(self._executor, self._write, batch_write, batch)
                else:
                    await loop.run_in_executor(self._executor, self._write,
                                               lambda events: self._store.append_audit(events[0]), batch)
            except _WriteFailed as failed:
                self._metrics.store_errors.labels("append_audit").inc()
                await self._keep(loop, failed.events, failed.cause)
            except Exception as e:
                self._metrics.audit_dropped.labels("write_failed").inc(len(batch))
                self._metrics.store_errors.labels("append_audit").inc()
                log.error("audit write failed for %d event(s), first %s: %s", len(batch),
                          _describe(batch[0]), e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _wait_window(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep for the batch window; ``close`` ends the wait early."""
        self._window_over = loop.create_future()
        timer = loop.call_later(self._window, _finish, self._window_over)
        try:
            await self._window_over
        finally:
            timer.cancel()
            self._window_over = None

    def _write(self, write: Callable[[list[AuditEvent]], None], batch: list[_Queued]) -> None:
        """In the executor: build the deferred events, then write the batch."""
        events = []
        built = 0
        for item in batch:
            if isinstance(item, AuditEvent):
                events.append(item)
                continue
            built += 1
            if built % BUILD_CHUNK == 0:
                time.sleep(0)  # releases the GIL: a waiting check runs now, not in 5 ms
            try:
                events.append(item())
            except Exception:  # a bug building one event must not lose the others
                self._metrics.audit_dropped.labels("build_failed").inc()
                log.exception("could not build an audit event")
        if events:
            try:
                write(events)
            except Exception as e:
                raise _WriteFailed(events, e) from e

    async def _keep(self, loop: asyncio.AbstractEventLoop, events: list[AuditEvent], cause: Exception) -> None:
        """The store refused ``events``: spool them (durably), or drop and count them."""
        kept = 0
        if self.spool is not None:
            try:
                kept = await loop.run_in_executor(self._executor, self.spool.put, events)
            except Exception as e:
                log.error("audit spool write failed: %s", e)
        if kept < len(events):
            self._metrics.audit_dropped.labels("spool_full" if self.spool is not None else "write_failed").inc(
                len(events) - kept)
            log.error("audit write failed (%s): dropped %d event(s), first %s", cause, len(events) - kept,
                      _describe(events[kept]))
        if kept:
            log.warning("audit write failed (%s): %d event(s) kept in the local spool for replay", cause, kept)

    async def _replay(self) -> None:
        """Write spooled events back to the store, oldest first, once it answers again."""
        assert self.spool is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._replay_interval)
            try:
                await loop.run_in_executor(self._executor, self.replay_once)
            except Exception as e:  # the store is still away: try again later
                log.debug("audit replay waits for the store: %s", e)

    def replay_once(self) -> int:
        """One replay round (blocking): returns how many spooled events reached the store."""
        assert self.spool is not None
        return self.spool.ship(self._store, MAX_BATCH, on_batch=lambda n: log.info(
            "audit replay: %d spooled event(s) written to the store", n),
            on_given_back=self._metrics.approval_uses_given_back.inc)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop."""
        if self._task is None:
            return
        self._closing = True  # no more waiting for company: flush now
        if self._window_over is not None:
            _finish(self._window_over)
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.error("audit writer stopped with %d events unwritten", self._queue.qsize())
        await cancel_and_wait(self._task)
        self._task = None
        if self._voids_task is not None:
            await cancel_and_wait(self._voids_task)
            self._voids_task = None
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    self._executor, self.apply_voids_once), timeout)
            except Exception as e:
                log.error("audit writer stopped with %d spend void(s) unapplied: %s", len(self._voids), e)
        await cancel_and_wait(self._replay_task)
        self._replay_task = None
