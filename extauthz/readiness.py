"""Health that tells the truth: NOT_SERVING while this replica cannot decide.

``Readiness`` runs beside the server and, every ``health.interval_s``, asks two questions:

- are the grants in memory usable (``grants.current()`` does not raise: they were loaded and
  are younger than ``grants_max_staleness_s``)?
- does the store answer (``store.grants_revision()`` within ``health.store_timeout_s``)? One
  failed probe is not enough: the store must have been failing for ``health.store_lost_after_s``.

When either answer is no, the gRPC health service (``""`` and the Authorization service) turns
NOT_SERVING, so Envoy's health checks move Checks to replicas that can decide; when both are
yes again it turns SERVING. Transitions are logged with the reason and exported as the
``rpcauthz_serving`` gauge. A drain stops the monitor first, so it never revives a draining
server.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .tasks import cancel_and_wait

log = logging.getLogger("extauthz")


class Readiness:
    """Watches the grants and the store; calls ``publish(serving, reason)`` on each change."""

    def __init__(self, *, store: Any, grants: Any, executor: concurrent.futures.Executor,
                 publish: Callable[[bool, str], Awaitable[None]], interval_s: float,
                 store_timeout_s: float, store_lost_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self._grants, self._executor = store, grants, executor
        self._publish = publish
        self.interval_s, self.store_timeout_s, self.store_lost_after_s = interval_s, store_timeout_s, store_lost_after_s
        self._clock = clock
        self._failing_since: float | None = None
        self._probe: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None
        self.reason = ""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="extauthz-readiness")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def evaluate(self) -> tuple[bool, str]:
        """One round: whether this replica can decide now, and if not, why."""
        try:
            self._grants.current()
        except Exception as e:  # StoreError from the cache; anything else is as bad
            return False, f"grants unusable: {e}"
        store_error = await self._probe_store()
        now = self._clock()
        if store_error is None:
            self._failing_since = None
            return True, "grants fresh, store answering"
        if self._failing_since is None:
            self._failing_since = now
        lost_for = now - self._failing_since
        if lost_for >= self.store_lost_after_s:
            return False, f"store lost for {lost_for:.0f}s: {store_error}"
        return True, f"store failing for {lost_for:.0f}s (not yet {self.store_lost_after_s:g}s): {store_error}"

    async def _probe_store(self) -> str | None:
        loop = asyncio.get_running_loop()
        if self._probe is not None and not self._probe.done():
            # The last probe is still stuck in the store: do not pile up threads behind it.
            return "the previous store probe has not returned (store hung)"
        self._probe = loop.run_in_executor(self._executor, self._store.grants_revision)
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), self.store_timeout_s)
        except TimeoutError:
            return f"no answer within {self.store_timeout_s:g}s"
        except Exception as e:
            return str(e) or type(e).__name__
        return None

    async def _run(self) -> None:
        while True:
            try:
                serving, reason = await self.evaluate()
            except Exception as e:  # a bug here must not leave a stale SERVING
                serving, reason = False, f"readiness check failed: {e!r}"
            if serving != self.serving:
                (log.info if serving else log.error)("health %s: %s",
                                                     "SERVING" if serving else "NOT_SERVING", reason)
                await self._publish(serving, reason)
            self.serving, self.reason = serving, reason
            await asyncio.sleep(self.interval_s)


__all__ = ["Readiness"]
