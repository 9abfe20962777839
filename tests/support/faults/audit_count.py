"""Decisions answered (by decision id, from Envoy's access log) against decision audit events
in the store: each decision must be audited exactly once."""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

#: ``decision.allow_with_approval`` is written by the store with the spend; its reason names the
#: decision ("call /svc/M (decision <id>)").
_IN_REASON = re.compile(r"\(decision ([0-9a-f]{32})\)")


def decisions_in_access_log(lines: list[dict[str, Any]]) -> list[str]:
    return [ln["decision_id"] for ln in lines if ln.get("decision_id") not in (None, "", "-")]


def decisions_answered(gw: Any, calls: int, *, wait_s: float = 15.0) -> list[str]:
    """Decision ids of the calls Envoy logged, once its access log holds a line per call sent
    (``calls``) or ``wait_s`` passed (Envoy writes the file log in buffered batches)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = gw.access_log_lines(wait_for=calls, timeout=1.0)
        if len(lines) >= calls or time.monotonic() > deadline:
            return decisions_in_access_log(lines)


def decision_id_of(event: Any) -> str | None:
    found = event.detail.get("decision_id")
    if found:
        return str(found)
    m = _IN_REASON.search(event.reason or "")
    return m.group(1) if m else None


def audited_decisions(store_url: str) -> collections.Counter[str]:
    """decision id -> number of ``decision.*`` audit events in the store."""
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        return collections.Counter(
            d for e in store.list_audit(limit=1_000_000)
            if e.kind.startswith("decision.") and (d := decision_id_of(e)) is not None)
    finally:
        store.close()


@dataclasses.dataclass
class AuditTally:
    expected: int
    written: int
    duplicated: int
    missing: list[str]
    duplicates: list[str]

    @property
    def exactly_once(self) -> bool:
        return not self.missing and not self.duplicates


def tally(decided: list[str], store_url: str, *, wait_s: float = 30.0) -> AuditTally:
    """Wait (up to ``wait_s``) until every decision in ``decided`` is audited, then count."""
    deadline = time.monotonic() + wait_s
    want = set(decided)
    while True:
        audited = audited_decisions(store_url)
        if want <= set(audited) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(0.5)  # a late duplicate would land by now
    audited = audited_decisions(store_url)
    missing = [d for d in want if d not in audited]
    duplicates = [d for d in want if audited[d] > 1]
    return AuditTally(expected=len(want), written=sum(1 for d in want if d in audited),
                      duplicated=len(duplicates), missing=missing, duplicates=duplicates)
