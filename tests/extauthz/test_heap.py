"""The server hands freed memory back to the system on a timer (extauthz/heap.py)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from extauthz import heap, server


def test_release_free_memory_returns_what_it_took() -> None:
    junk = [bytearray(4096) for _ in range(2000)]  # something freed to hand back
    del junk
    took = heap.release_free_memory()
    assert 0 <= took < 5  # a generous bound: it is a few ms


async def test_the_server_releases_memory_every_interval_in_a_worker_thread(monkeypatch) -> None:
    import threading
    calls: list[str] = []
    monkeypatch.setattr(server, "release_free_memory", lambda: calls.append(threading.current_thread().name) or 0.0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker") as executor:
        task = asyncio.get_running_loop().create_task(server._release_memory(executor, 0.01))
        await asyncio.sleep(0.2)
        assert not task.done()  # it keeps going
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(calls) >= 2 and all(name.startswith("worker") for name in calls)


async def test_a_failing_release_does_not_stop_the_timer(monkeypatch) -> None:
    calls = 0

    def failing() -> float:
        nonlocal calls
        calls += 1
        raise OSError("no")
    monkeypatch.setattr(server, "release_free_memory", failing)
    with ThreadPoolExecutor(max_workers=1) as executor:
        task = asyncio.get_running_loop().create_task(server._release_memory(executor, 0.01))
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls >= 2
