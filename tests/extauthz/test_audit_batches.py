"""Batched audit writes: ``append_audits`` (one executemany per batch) on SQLite and
PostgreSQL, and the writer building many deferred events in GIL-friendly chunks."""
from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from extauthz import audit_writer
from extauthz.audit_writer import AuditWriter
from extauthz.metrics import Metrics
from extauthz.pipeline import audit_event_id
from policy import StoreError
from policy.audit import AuditEvent
from policy.stores import open_store

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def _event(n: int, **kw) -> AuditEvent:
    fields = dict(kind="decision.allow", actor=f"user{n}", at=T0 + timedelta(microseconds=n),
                  service="pkg.Svc", method="Do", outcome="allow", reason=f"reason {n}",
                  detail={"decision_id": f"d{n}", "rule": "engineer.allowed", "mode": "X"},
                  id=audit_event_id())
    fields.update(kw)
    return AuditEvent(**fields)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    else:
        s = open_store(request.getfixturevalue("pg_dsn"))
    try:
        yield s
    finally:
        s.close()


def test_append_audits_writes_every_event_with_every_field(store):
    events = [_event(n, request_id="r1" if n % 2 else None, trace_id=f"t{n}") for n in range(40)]
    store.append_audits(events)
    store.append_audits([])  # nothing to write is not an error
    assert store.list_audit() == events


def test_append_audits_is_one_transaction(store):
    store.append_audits([_event(0)])
    bad = _event(1, actor=None)  # NOT NULL in the table: the third row fails the batch
    with pytest.raises(StoreError):
        store.append_audits([_event(2), _event(3), bad, _event(4)])
    # Nothing of the failed batch was written, not even the events before the bad one.
    assert [e.actor for e in store.list_audit()] == ["user0"]
    # A duplicate id is not a failure: it is skipped (replaying the audit spool is idempotent).
    again = _event(5)
    store.append_audits([again])
    store.append_audits([_event(6), again])
    assert [e.actor for e in store.list_audit()] == ["user0", "user5", "user6"]


async def test_writer_builds_many_deferred_events_and_loses_none(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    metrics = Metrics()
    writer = AuditWriter(store, metrics, 1000, batch_window=0.05)
    writer.start()
    try:
        n = 3 * audit_writer.BUILD_CHUNK + 5  # several chunks, the GIL handed back between them
        for i in range(n):
            writer.submit(lambda i=i: _event(i))
        writer.submit(lambda: 1 / 0)  # a broken builder loses only its own event
        await writer.close()
        assert sorted(e.actor for e in store.list_audit()) == sorted(f"user{i}" for i in range(n))
        assert metrics.registry.get_sample_value("rpcauthz_audit_dropped_total",
                                                 {"why": "build_failed"}) == 1
    finally:
        store.close()


def _stored(store, ids) -> list[tuple]:
    """What the store holds of ``ids``, field by field, in a form both backends compare in."""
    return sorted((e.id, e.kind, e.actor, e.at, e.request_id, e.service, e.method, e.outcome, e.reason,
                   e.detail, e.trace_id) for e in store.list_audit(limit=10_000) if e.id in ids)


def test_spool_rows_go_in_as_the_database_reads_them_and_equal_the_events(store):
    """``append_audit_json`` (the spool's canonical rows decoded by the database) stores exactly
    what ``append_audits`` stores for the same events, skips ids it holds, and is one transaction."""
    from extauthz.audit_spool import event_json, is_canonical

    odd = {"decision_id": "d", "nested": {"b": [1, 2.5, None, True], "a": "é \" \\ \u2028"}, "n": 10**15}
    events = [_event(n, actor=f"ü{n}\"'", reason="x" * 400, detail=dict(odd, decision_id=f"d{n}"),
                     request_id="r1" if n % 2 else None, trace_id="t" if n == 3 else None) for n in range(6)]
    rows = [event_json(e) for e in events]
    assert all(map(is_canonical, rows))
    store.append_audit_json(rows)
    store.append_audit_json(rows[:2])  # held ids: skipped
    store.append_audit_json([])
    twins = [dataclasses.replace(e, id=audit_event_id()) for e in events]
    store.append_audits(twins)
    got = _stored(store, {e.id for e in events})
    want = _stored(store, {e.id for e in twins})
    assert len(got) == 6 and sorted(g[1:] for g in got) == sorted(w[1:] for w in want)
    first = next(g for g in got if g[0] == events[0].id)
    assert first[2:4] == ('ü0"\'', T0) and first[9] == events[0].detail
    bad = event_json(_event(9)).replace('"kind":"decision.allow"', '"kind":null')  # NOT NULL
    with pytest.raises(StoreError):
        store.append_audit_json([event_json(_event(8)), bad])
    assert not [e for e in store.list_audit(limit=10_000) if e.actor in ("user8", "user9")]


def test_sqlite_writes_a_fast_path_sized_batch_of_columns_whole_and_refuses_a_row_of_the_wrong_width(tmp_path):
    """A batch the size of Envoy's access-log messages (1,300 events: several multi-row
    INSERTs of 1,024, 256, 16 and 4 rows) is written whole and in order, held ids skipped
    wherever they fall; a row with a value missing or extra is refused by its position
    before anything is written (flattened into one statement's values, it would shift
    every later row's columns)."""
    from extauthz.access_log import event_columns

    store = open_store(f"sqlite:///{tmp_path / 'cols.db'}")
    try:
        events = [_event(n, request_id=f"r{n}" if n % 3 else None) for n in range(1300)]
        store.append_audit_rows([event_columns(e) for e in events[::7]])
        store.append_audit_rows([event_columns(e) for e in events])
        assert store.list_audit(limit=10_000) == events
        late = [_event(n) for n in range(2000, 2003)]
        rows = [event_columns(e) for e in late]
        for bad in ((*rows[1], None), rows[1][:-1]):
            with pytest.raises(ValueError, match=r"audit row 1 has 1[02] values, not one per column \(11\)"):
                store.append_audit_rows([rows[0], bad, rows[2]])
        assert len(store.list_audit(limit=10_000)) == 1300
    finally:
        store.close()


def test_sqlite_cuts_the_columns_batch_to_what_its_sqlite_allows_per_statement(tmp_path, monkeypatch):
    """An SQLite before 3.32 (or a build that lowers it) allows 999 values per statement, not
    32,766: a 512-row INSERT (5,632 values) would fail there on every batch, sending every
    fast-path message through the spool. The store asks its connection's limit and cuts the
    batch to fit (here 64 rows per INSERT), and refuses plainly where not one row fits."""
    import sqlite3

    from extauthz.access_log import event_columns
    from policy.stores.sqlite import SQLiteStore, _rows_per_insert

    connect = SQLiteStore._connect

    def like_sqlite_3_31(self):
        conn = connect(self)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return conn

    monkeypatch.setattr(SQLiteStore, "_connect", like_sqlite_3_31)
    store = open_store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        events = [_event(n) for n in range(1300)]
        store.append_audit_rows([event_columns(e) for e in events])
        assert store.list_audit(limit=10_000) == events
    finally:
        store.close()
    assert [_rows_per_insert(limit, 11) for limit in (250_000, 32_766, 999, 22, 11)] == [512, 512, 64, 2, 1]
    with pytest.raises(StoreError, match="allows 10 values per statement, fewer than the 11 of one audit row"):
        _rows_per_insert(10, 11)


def test_sqlite_takes_the_events_columns_and_stores_exactly_what_their_spool_rows_store(tmp_path):
    """``SQLiteStore.append_audit_rows`` (the fast path's columns, ``event_columns``: no JSON
    decode in this process) stores, byte for byte, what ``append_audit_json`` stores for the
    same events' spool rows; it skips ids it holds and is one transaction."""
    import sqlite3

    from extauthz.access_log import event_columns
    from extauthz.audit_spool import event_json

    odd = {"decision_id": "d", "nested": {"b": [1, 2.5, None, True], "a": "é \" \\ \u2028"}, "n": 10**15}
    events = [_event(n, actor=f"ü{n}\"'", reason="x" * 400, detail=dict(odd, decision_id=f"d{n}"),
                     at=(T0 + timedelta(microseconds=n)).astimezone(timezone(timedelta(hours=2))),
                     request_id="r1" if n % 2 else None, trace_id="t" if n == 3 else None) for n in range(6)]
    twins = [dataclasses.replace(e, id=audit_event_id()) for e in events]
    by_json, by_columns = open_store(f"sqlite:///{tmp_path / 'json.db'}"), open_store(f"sqlite:///{tmp_path / 'cols.db'}")
    try:
        by_json.append_audit_json([event_json(e) for e in events])
        by_columns.append_audit_rows([event_columns(e) for e in events])
        by_columns.append_audit_rows([event_columns(e) for e in events[:2]])  # held ids: skipped
        by_columns.append_audit_rows([])
        with pytest.raises(StoreError):  # NOT NULL kind: the whole batch fails
            by_columns.append_audit_rows([event_columns(twins[0]), (*event_columns(twins[1])[:1], None,
                                                                    *event_columns(twins[1])[2:])])
        assert by_columns.list_audit(limit=100) == by_json.list_audit(limit=100) == events
    finally:
        by_json.close()
        by_columns.close()

    def raw(path) -> list[tuple]:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    assert raw(tmp_path / "cols.db") == raw(tmp_path / "json.db")
    assert len(raw(tmp_path / "cols.db")) == 6
