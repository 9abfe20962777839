"""A bounded load of several callers at once, each with the answer it should get.

``Caller("engineer lists", LIST, token, expect=ALLOW)`` is one kind of call (one path, one
token) on ``threads`` persistent channels (``tests/support/call_load.CallLoad``). A caller
expecting ``DENY`` that gets OK is a wrong allow; a caller of an approval-mode method
(``APPROVAL``) may pass only as often as its approval's uses were spent (the scenario compares
those against the store).
"""
from __future__ import annotations

import dataclasses
import time

import grpc

from tests.support.call_load import CallLoad

ALLOW, DENY, APPROVAL = "allow", "deny", "approval"
_EXPECTED = {ALLOW: grpc.StatusCode.OK, DENY: grpc.StatusCode.PERMISSION_DENIED,
             APPROVAL: grpc.StatusCode.OK}


@dataclasses.dataclass
class Caller:
    name: str
    path: str
    token: str
    expect: str = ALLOW
    threads: int = 1
    pause: float = 0.0

    def __post_init__(self) -> None:
        if self.expect not in _EXPECTED:
            raise ValueError(f"caller {self.name!r}: expect must be one of {sorted(_EXPECTED)}, "
                             f"not {self.expect!r}")


class MixedLoad:
    """Runs every caller until ``stop()``; then answers questions about what happened."""

    def __init__(self, gateway: str, callers: list[Caller], *, timeout: float = 5.0) -> None:
        self.callers = callers
        self.loads = {c.name: CallLoad(gateway, c.path, c.token, threads=c.threads,
                                       timeout=timeout, pause=c.pause) for c in callers}

    def start(self) -> MixedLoad:
        for load in self.loads.values():
            load.start()
        return self

    def stop(self) -> None:
        for load in self.loads.values():
            load._stop.set()  # noqa: SLF001 (stop all at once, then join)
        for load in self.loads.values():
            load.stop()

    def __enter__(self) -> MixedLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def results(self, name: str | None = None) -> list[tuple[float, grpc.StatusCode]]:
        names = [name] if name else list(self.loads)
        return sorted(r for n in names for r in self.loads[n].between(0))

    def calls(self) -> int:
        return len(self.results())

    def count(self, code: grpc.StatusCode, name: str | None = None) -> int:
        return sum(1 for _, c in self.results(name) if c is code)

    def wrong_allows(self) -> int:
        """OK answers to callers that must be refused (approval callers: see the module doc)."""
        return sum(self.count(grpc.StatusCode.OK, c.name) for c in self.callers if c.expect == DENY)

    def summary(self) -> dict[str, dict[str, int]]:
        return {n: CallLoad.summary(self.results(n)) for n in self.loads}

    def last_unexpected(self, since: float, names: list[str] | None = None) -> float | None:
        """Time of the last answer since ``since`` that was not the caller's expected one."""
        last = None
        for c in self.callers:
            if names is not None and c.name not in names:
                continue
            for t, code in self.loads[c.name].between(since):
                if code is not _EXPECTED[c.expect]:
                    last = t if last is None else max(last, t)
        return last

    def recovery_s(self, fault_start: float, fault_end: float, names: list[str] | None = None) -> float:
        """Seconds after ``fault_end`` until every caller got its expected answer again."""
        last = self.last_unexpected(fault_start, names)
        return 0.0 if last is None else max(0.0, last - fault_end)

    def unexpected_after(self, t: float, names: list[str] | None = None) -> int:
        return sum(1 for c in self.callers if names is None or c.name in names
                   for _, code in self.loads[c.name].between(t) if code is not _EXPECTED[c.expect])

    def wait_expected(self, since: float, within: float, *, names: list[str] | None = None,
                      steady_s: float = 1.0) -> bool:
        """Poll until every caller (of ``names``) got answers in the last ``steady_s`` and all
        answers since then and since ``since`` were the expected ones; False after ``within``
        seconds (the scenario's goals then tell what did not come back)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            time.sleep(0.1)
            recent = time.monotonic() - steady_s
            if recent <= since:
                continue
            if self.unexpected_after(recent, names) == 0 and all(
                    self.loads[c.name].between(recent) for c in self.callers if names is None or c.name in names):
                return True
        return False
