"""Decision audit events, written to the store in the background.

Writing never blocks or changes a decision: ``submit`` only enqueues; a full queue or a
failing store drops the event and counts it in ``rpcauthz_audit_dropped``. Events queued
while a write is under way are written together in one transaction (``append_audits``). (An allow that
spends an approval is different: its use and its audit event are one store transaction,
done in the decision path by ``Store.update_request``.)
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from policy.audit import AuditEvent

from .metrics import Metrics

log = logging.getLogger("extauthz.audit")

#: Most events written in one store transaction.
MAX_BATCH = 500


class AuditWriter:
    def __init__(self, store, metrics: Metrics, queue_size: int, executor: Executor | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(maxsize=queue_size)
        self._executor = executor
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, event: AuditEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.audit_dropped.labels("queue_full").inc()
            log.error("audit queue full: dropped %s for %s", event.kind, event.actor)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # Everything queued meanwhile goes in one transaction when the store can batch.
            batch_write = getattr(self._store, "append_audits", None)
            if batch_write is not None:
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
            try:
                if batch_write is not None:
                    await loop.run_in_executor(self._executor, batch_write, batch)
                else:
                    await loop.run_in_executor(self._executor, self._store.append_audit, batch[0])
            except Exception as e:
                self._metrics.audit_dropped.labels("write_failed").inc(len(batch))
                self._metrics.store_errors.labels("append_audit").inc()
                log.error("audit write failed for %d event(s), first %s %s: %s", len(batch),
                          batch[0].kind, batch[0].id, e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.error("audit writer stopped with %d events unwritten", self._queue.qsize())
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
