"""Garbage collections held off while a large grant set is loaded and built.

Loading every grant makes tens of thousands of objects the collector tracks (a ``Grant``
per row, the new index's tuples) that either die within the load or are untracked by the
first young collection that sees them. Left to run, the collector promotes them while
they are still alive and soon runs a full collection over them: at 30,000 grants one of
12-30 ms per reload, a pause of every check on the process (extauthz freezes its start-up
heap, so its oldest generation is small and fills quickly). With collections held off for
the load, the ``Grant`` objects are freed by reference counting and the next young
collection sees the new index once (a few ms).

Process-wide (``gc.disable``), counted across threads: collections resume when the last
holder leaves, and only if they were enabled when the first one came. While held, only
cyclic garbage waits (nothing is lost); a store that does not answer holds them off for as
long as its own timeouts let it.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_state = {"holders": 0, "resume": False}


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No garbage collection runs (in any thread) until the block is left."""
    with _lock:
        if _state["holders"] == 0:
            _state["resume"] = gc.isenabled()
            gc.disable()
        _state["holders"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["holders"] -= 1
            if _state["holders"] == 0 and _state["resume"]:
                gc.enable()
