"""The hot path's view of role grants: a ``GrantSet`` in memory, kept fresh by the store.

``GrantCache.current()`` never does I/O. A background thread follows the store's change
feed (``watch_grant_deltas``: NOTIFY payloads on PostgreSQL, revision polling plus the
change log on SQLite) and applies each change as a delta (``GrantSet.apply``: a new set
sharing everything unchanged, swapped in with one assignment). When a delta does not
carry its changes, it reads them from the store's change log (``grant_changes_since``);
only when the log no longer reaches back does it load everything.

Every ``reload_interval`` seconds it reconciles anyway, in case a change slipped past the
feed: it loads every grant in batches (giving the interpreter lock back between them),
builds a new set aside and swaps it in. If the store has not answered for
``max_staleness`` seconds, ``current()`` raises ``StoreError``: deciding on grants that may
have been revoked long ago would be failing open.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from .errors import StoreError
from .gc_pause import collections_paused
from .grant_delta import GrantDelta
from .grants import GrantSet
from .store import Store, Subscription

log = logging.getLogger(__name__)


def _yield_lock() -> None:
    time.sleep(0)  # let the serving threads run between batches of a full load


def catch_up(store: Store, held: GrantSet | None, pause: Callable[[], None] | None = None) -> GrantSet:
    """``held`` brought up to the store's current revision: by applying the change log's
    delta when it reaches back to ``held.revision``, else by loading every grant. Raises
    ``StoreError`` if the store cannot be read."""
    if held is not None:
        delta = store.grant_changes_since(held.revision)
        if delta is not None and delta.changes is not None:
            return held if delta.revision == held.revision else held.apply(delta)
    with collections_paused():  # see policy/gc_pause.py
        revision, grants = store.load_grants(pause)
        return GrantSet(grants, revision=revision)


class GrantCache:
    """Grants for decisions, from memory, refreshed from ``store``.

    Usage::

        cache = GrantCache(store, reload_interval=30, max_staleness=120).start()
        decide(principal, target, mode, cache.current(), requests, now)
        ...
        cache.close()
    """

    def __init__(self, store: Store, *, reload_interval: float = 30.0,
                 max_staleness: float = 120.0, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if reload_interval <= 0 or retry_interval <= 0:
            raise ValueError("reload_interval and retry_interval must be positive")
        if max_staleness <= reload_interval:
            raise ValueError(f"max_staleness ({max_staleness}s) must be longer than "
                             f"reload_interval ({reload_interval}s), or every reload would be late")
        self._store = store
        self.reload_interval = reload_interval
        self.max_staleness = max_staleness
        self.retry_interval = retry_interval
        self._clock = clock
        self._grants: GrantSet | None = None
        self._loaded_at: float | None = None
        self._last_error: StoreError | None = None
        self._deltas: collections.deque[GrantDelta] = collections.deque()
        self._swap = threading.Lock()
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Subscription | None = None
        #: Counters for metrics and benchmarks.
        self.stats = {"deltas_applied": 0, "log_catch_ups": 0, "full_loads": 0}

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> GrantCache:
        """Load the grants (raising ``StoreError`` if the store cannot be read) and begin
        following changes. Returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("GrantCache already started")
        self.refresh()
        self._subscription = self._store.watch_grant_deltas(self._on_delta)
        self._thread = threading.Thread(target=self._run, name="grant-cache", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following the store. ``current()`` keeps answering until it goes stale."""
        self._stop.set()
        self._wake.set()
        if self._subscription is not None:
            self._subscription.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> GrantCache:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the hot path -----------------------------------------------------------------------
    def current(self) -> GrantSet:
        """The grants as of the last successful load. No I/O.

        Raises ``StoreError`` if nothing was ever loaded or the store has not been heard
        from for more than ``max_staleness`` seconds.
        """
        grants, loaded_at = self._grants, self._loaded_at
        if grants is None or loaded_at is None:
            raise StoreError("grants have not been loaded from the store yet")
        age = self._clock() - loaded_at
        if age > self.max_staleness:
            cause = f": {self._last_error}" if self._last_error else ""
            raise StoreError(f"grants are {age:.0f}s old, past the {self.max_staleness:g}s "
                             f"max staleness; the store has not answered{cause}")
        return grants

    # --- observability ----------------------------------------------------------------------
    @property
    def revision(self) -> int | None:
        """The store revision the held grants are at."""
        return None if self._grants is None else self._grants.revision

    def age(self) -> float | None:
        """Seconds since the store last confirmed the held grants."""
        return None if self._loaded_at is None else self._clock() - self._loaded_at

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Block until grants at ``revision`` or later are held (for tools and tests)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._grants is not None and self._grants.revision >= revision, timeout)

    # --- loading ----------------------------------------------------------------------------
    def refresh(self) -> GrantSet:
        """Load every grant now (I/O), build the set aside and swap it in. Raises
        ``StoreError`` if the store cannot be read."""
        try:
            with collections_paused():  # see policy/gc_pause.py
                revision, grants = self._store.load_grants(_yield_lock)
                built = GrantSet(grants, revision=revision)
                del grants
        except StoreError as e:
            self._last_error = e
            raise
        self.stats["full_loads"] += 1
        return self._install(built)

    def _install(self, grants: GrantSet) -> GrantSet:
        with self._swap:
            held = self._grants
            if held is not None and grants.revision < held.revision:
                grants = held  # a slower load lost the race to newer deltas: keep the newer
            self._grants = grants
            self._loaded_at = self._clock()
            self._last_error = None
        with self._changed:
            self._changed.notify_all()
        return grants

    def _on_delta(self, delta: GrantDelta) -> None:
        self._deltas.append(delta)
        self._wake.set()

    def _follow(self) -> None:
        """Apply queued deltas in order; read the change log for any that do not carry
        their changes or leave a gap, and load everything if the log cannot help."""
        need_store = False
        while self._deltas:
            delta = self._deltas.popleft()
            held = self._grants
            if held is None:
                need_store = True
                continue
            if delta.revision <= held.revision:
                continue  # already held (a full load got there first)
            if delta.changes is not None and delta.since == held.revision:
                self._install(held.apply(delta))
                self.stats["deltas_applied"] += 1
            else:
                need_store = True
        if need_store:
            self._catch_up()

    def _catch_up(self) -> None:
        try:
            held = self._grants
            delta = None if held is None else self._store.grant_changes_since(held.revision)
        except StoreError as e:
            self._last_error = e
            raise
        if held is None or delta is None or delta.changes is None:
            self.refresh()
            return
        self.stats["log_catch_ups"] += 1
        self._install(held if delta.revision == held.revision else held.apply(delta))

    def _run(self) -> None:
        wait = self.reload_interval
        next_reconcile = self._clock() + self.reload_interval
        while True:
            self._wake.wait(max(0.0, min(wait, next_reconcile - self._clock())))
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                if self._clock() >= next_reconcile:
                    self._deltas.clear()  # the full load covers them
                    self.refresh()
                    next_reconcile = self._clock() + self.reload_interval
                else:
                    self._follow()
                wait = self.reload_interval
            except StoreError as e:
                log.warning("grant reload failed: %s (retrying in %.1fs)", e, self.retry_interval)
                wait = self.retry_interval
                next_reconcile = min(next_reconcile, self._clock() + self.retry_interval)
