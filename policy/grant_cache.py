"""The hot path's view of role grants: a ``GrantSet`` in memory, kept fresh by the store.

``GrantCache.current()`` never does I/O. A background thread reloads every grant when
the store announces a change (``watch_grants``: LISTEN/NOTIFY on PostgreSQL, polling on
SQLite) and, as a safety net for lost notifications, every ``reload_interval`` seconds.
If no load has succeeded for ``max_staleness`` seconds (the store is unreachable),
``current()`` raises ``StoreError``: deciding on grants that may have been revoked long
ago would be failing open.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import StoreError
from .grants import GrantSet
from .store import Store, Subscription

log = logging.getLogger(__name__)


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
        self._seen_revision = -1
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Subscription | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> GrantCache:
        """Load the grants (raising ``StoreError`` if the store cannot be read) and begin
        following changes. Returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("GrantCache already started")
        self.refresh()
        self._subscription = self._store.watch_grants(self._on_change)
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

        Raises ``StoreError`` if nothing was ever loaded or the last successful load is
        older than ``max_staleness`` seconds.
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
        """The store revision the held grants were loaded at."""
        return None if self._grants is None else self._grants.revision

    def age(self) -> float | None:
        """Seconds since the last successful load."""
        return None if self._loaded_at is None else self._clock() - self._loaded_at

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Block until grants at ``revision`` or later are held (for tools and tests)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._grants is not None and self._grants.revision >= revision, timeout)

    # --- loading ----------------------------------------------------------------------------
    def refresh(self) -> GrantSet:
        """Reload every grant now (I/O). Raises ``StoreError`` if the store cannot be read."""
        try:
            # Revision first: a change landing between the two reads leaves us holding
            # newer grants under an older revision, and its notification reloads again.
            revision = self._store.grants_revision()
            grants = GrantSet(self._store.list_grants(), revision=revision)
        except StoreError as e:
            self._last_error = e
            raise
        with self._changed:
            self._grants = grants
            self._loaded_at = self._clock()
            self._last_error = None
            self._changed.notify_all()
        return grants

    def _on_change(self, revision: int) -> None:
        self._seen_revision = max(self._seen_revision, revision)
        self._wake.set()

    def _run(self) -> None:
        wait = self.reload_interval
        while True:
            self._wake.wait(wait)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.refresh()
                wait = self.reload_interval
            except StoreError as e:
                log.warning("grant reload failed: %s (retrying in %.1fs)", e, self.retry_interval)
                wait = self.retry_interval
