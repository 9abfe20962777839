"""Functions run in child processes by the store concurrency tests (must be importable)."""
from __future__ import annotations

import time
from datetime import datetime

from policy import PolicyError, use
from policy.stores import open_store


def spend_one_use(url: str, request_id: str, now_iso: str, start_at: float) -> str:
    """Open the store in this process, wait for the common start time, spend one use."""
    now = datetime.fromisoformat(now_iso)
    store = open_store(url)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        try:
            store.update_request(request_id, lambda r: (time.sleep(0.02), use(r, now))[1],
                                 actor="alice", kind="request.used")
            return "ok"
        except PolicyError as e:
            return type(e).__name__
    finally:
        store.close()
