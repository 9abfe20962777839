"""Audit that survives a store outage (issue 9, finding 4): a batch the store refuses goes to
the local fsync'd spool instead of being dropped, and is replayed once the store answers,
exactly once (the store ignores event ids it holds)."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from extauthz.audit_spool import AuditSpool
from extauthz.audit_writer import AuditWriter
from extauthz.metrics import Metrics
from policy import StoreError
from policy.audit import AuditEvent
from policy.stores import open_store


class FlakyStore:
    """The real store; ``down`` makes every audit write fail like an unreachable database."""

    def __init__(self, store) -> None:
        self._store, self.down = store, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def append_audits(self, events):
        if self.down:
            raise StoreError("connection refused (store away)")
        return self._store.append_audits(events)


def _events(n: int, tag: str = "d") -> list[AuditEvent]:
    return [AuditEvent(kind="decision.allow", actor=f"user{i}", at=datetime.now(UTC), service="a.v1.S",
                       method="M", outcome="allow", detail={"decision_id": f"{tag}{i}"}) for i in range(n)]


def _dropped(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.audit_dropped.collect() for s in m.samples if s.name.endswith("_total"))


async def test_store_outage_spools_then_replays_every_event_exactly_once(tmp_path):
    store = FlakyStore(open_store(f"sqlite:///{tmp_path / 'store.db'}"))
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=1000)
    metrics = Metrics()
    writer = AuditWriter(store, metrics, 1000, batch_window=0.01, spool=spool, replay_interval=0.1)
    writer.start()
    try:
        store.down = True
        sent = _events(120)
        for e in sent:
            writer.submit(e)
        for _ in range(100):
            if spool.stats()["depth"] == 120:
                break
            await asyncio.sleep(0.05)
        assert spool.stats()["depth"] == 120 and spool.stats()["age_seconds"] >= 0
        assert _dropped(metrics) == 0
        assert store.list_audit() == []
        store.down = False
        for _ in range(100):
            if spool.stats()["depth"] == 0:
                break
            await asyncio.sleep(0.05)
        assert spool.stats()["depth"] == 0
    finally:
        await writer.close()
    written = [e.id for e in store.list_audit(limit=10_000)]
    assert sorted(written) == sorted(e.id for e in sent)  # each exactly once
    # A replay cut short (store committed, spool not yet emptied) writes nothing twice.
    spool.put(sent[:30])
    assert writer.replay_once() == 30
    assert len(store.list_audit(limit=10_000)) == 120
    spool.close()
    store.close()


async def test_spool_is_bounded_and_counts_what_it_drops(tmp_path):
    store = FlakyStore(open_store("sqlite:///:memory:"))
    store.down = True
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=10)
    metrics = Metrics()
    writer = AuditWriter(store, metrics, 1000, spool=spool, replay_interval=60)
    writer.start()
    try:
        for e in _events(25):
            writer.submit(e)
        for _ in range(100):
            if _dropped(metrics) == 15:
                break
            await asyncio.sleep(0.05)
    finally:
        await writer.close()
    assert spool.stats()["depth"] == 10 and _dropped(metrics) == 15
    spool.close()
    store.close()


def test_spooled_events_survive_a_restart(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = AuditSpool(path, max_events=100)
    sent = _events(5)
    assert spool.put(sent) == 5
    spool.close()  # the process goes away; the file stays
    again = AuditSpool(path, max_events=100)
    back = again.oldest(10)
    assert [e.id for e in back] == [e.id for e in sent]
    assert back[0] == sent[0]  # every field round-trips
    again.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_store_ignores_an_audit_event_it_already_holds(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    store = open_store(url)
    try:
        events = _events(3)
        store.append_audits(events)
        store.append_audits(events[1:] + _events(1, tag="x"))
        ids = [e.id for e in store.list_audit(limit=100) if e.kind == "decision.allow"]
        assert len(ids) == 4 and len(set(ids)) == 4
    finally:
        store.close()
