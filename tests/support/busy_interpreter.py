"""Run a call beside a thread that keeps the interpreter busy, as a loaded server's checks do.

Python's sqlite3 lets go of the interpreter lock around every statement step; beside a busy
thread each step then waits up to the switch interval (5 ms) to get it back. Tests of code
that must not read or write row by row on a busy process run it through ``beside_busy_thread``.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def beside_busy_thread(call: Callable[[], T], timeout: float) -> list[T]:
    """``[call()]`` if it returned within ``timeout`` seconds while another thread kept the
    interpreter busy, else ``[]``. Waits for the call to end either way (the busy thread
    stops at ``timeout``, so a late call then finishes quickly)."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(100))

    done: list[T] = []
    spinner = threading.Thread(target=busy)
    worker = threading.Thread(target=lambda: done.append(call()))
    spinner.start()
    try:
        worker.start()
        worker.join(timeout=timeout)
        result = list(done)  # what had returned by then
    finally:
        stop.set()
        spinner.join()
        worker.join()
    return result
