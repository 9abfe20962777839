"""Audit that survives a store outage (issue 9, finding 4): a batch the store refuses goes to
the local fsync'd spool instead of being dropped, and is replayed once the store answers,
exactly once (the store ignores event ids it holds)."""
from __future__ import annotations

import asyncio
from dataclasses import replace as dataclasses_replace
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

    def append_audit_json(self, events):
        if self.down:
            raise StoreError("connection refused (store away)")
        return self._store.append_audit_json(events)

    def append_audit_rows(self, rows):
        if self.down:
            raise StoreError("connection refused (store away)")
        return self._store.append_audit_rows(rows)


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


def test_the_spool_is_on_by_default_in_the_state_directory(tmp_path, monkeypatch):
    from extauthz.config import load_settings, spool_file

    monkeypatch.setenv("RPCAUTHZ_STATE_DIR", str(tmp_path))
    settings = load_settings(env={}, overrides={"store_url": "memory:"})
    assert spool_file(settings.audit) == str(tmp_path / "audit-spool.db")
    monkeypatch.delenv("RPCAUTHZ_STATE_DIR")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'sd'}:/elsewhere")  # systemd's StateDirectory=
    assert spool_file(settings.audit) == str(tmp_path / "sd" / "audit-spool.db")
    assert spool_file(settings.audit.model_copy(update={"spool_path": "/abs/s.db"})) == "/abs/s.db"
    off = load_settings(env={}, overrides={"store_url": "memory:", "audit.spool_path": None})
    assert spool_file(off.audit) is None


async def test_server_without_spool_config_spools_before_answering_and_warns_when_off(tmp_path, monkeypatch,
                                                                                     caplog):
    """A server started with no audit options keeps its events in the state directory's spool."""
    import sqlite3

    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    from devstack.processes import free_port
    from extauthz.config import load_settings
    from extauthz.server import Components, serve
    from policy import Grant, GrantSet, Mode, Role
    from reflection_cache.types import ServiceModes
    from tests.extauthz.test_server import ACCOUNTS, check_request
    from tests.support.extauthz_doubles import FixedGrants, StaticModes

    monkeypatch.setenv("RPCAUTHZ_STATE_DIR", str(tmp_path))
    for overrides in ({}, {"audit.spool_path": None}):
        port = free_port()
        settings = load_settings(env={}, overrides={"store_url": "memory:", "listen.port": port,
                                                    "metrics.port": None, "drain_notice_s": 0,
                                                    "audit.batch_window_ms": 5000, **overrides})
        modes = StaticModes({ACCOUNTS: ServiceModes(ACCOUNTS, {"ListAccounts": Mode.ENGINEERS_WITHOUT_APPROVAL})})
        comps = Components(open_store("sqlite:///:memory:"), FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)])),
                           modes)
        stop = asyncio.Event()
        ready = asyncio.Event()
        server = asyncio.create_task(serve(settings, components=comps, stop=stop, install_signal_handlers=False,
                                           on_ready=lambda _p, r=ready: r.set()))
        await asyncio.wait_for(ready.wait(), 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=5)
        assert resp.status.code == 0
        spool = tmp_path / "audit-spool.db"
        if not overrides:
            # Answered, and (5 s window: not yet shipped) already on disk in the default spool.
            with sqlite3.connect(spool) as db:
                assert db.execute("SELECT COUNT(*) FROM audit_spool").fetchone()[0] == 1
        else:
            assert "AUDIT SPOOL OFF" in caplog.text
        stop.set()
        await server
    # Both events reached the store at the drains; the spool is empty again.
    with sqlite3.connect(tmp_path / "audit-spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM audit_spool").fetchone()[0] == 0


async def test_spool_first_writer_keeps_events_through_an_outage_and_ships_each_once(tmp_path):
    from extauthz.spooled_audit import SpooledAuditWriter

    store = FlakyStore(open_store(f"sqlite:///{tmp_path / 'store.db'}"))
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=1000)
    writer = SpooledAuditWriter(store, Metrics(), spool, 1000, batch_window=0.01, replay_interval=0.1)
    writer.start()
    try:
        store.down = True
        sent = _events(60)
        for e in sent:
            writer.submit(e)
        await writer.acknowledged()
        assert spool.stats()["depth"] == 60  # durable before acknowledged returns
        await asyncio.sleep(0.3)
        assert store.list_audit() == [] and spool.stats()["depth"] == 60
        store.down = False
        for _ in range(100):
            if spool.stats()["depth"] == 0:
                break
            await asyncio.sleep(0.05)
        assert sorted(e.id for e in store.list_audit()) == sorted(e.id for e in sent)
    finally:
        await writer.close()
        spool.close()


async def test_the_spool_is_written_while_the_store_holds_every_shared_thread(tmp_path):
    """A hung store: its calls hold every thread of the executor the server shares with the
    store (and more wait behind them). An answered check's event must still reach the spool
    before ``acknowledged`` returns: the spool has a thread of its own."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from extauthz.spooled_audit import SpooledAuditWriter

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=1000)
    shared = ThreadPoolExecutor(max_workers=2)
    hung = threading.Event()
    loop = asyncio.get_running_loop()
    stuck = [loop.run_in_executor(shared, hung.wait) for _ in range(4)]  # 2 running, 2 queued
    writer = SpooledAuditWriter(store, Metrics(), spool, 1000, shared, replay_interval=60, ack_timeout=5.0)
    writer.start()
    try:
        writer.submit(_events(1)[0])
        await writer.acknowledged()
        assert spool.stats()["depth"] == 1  # durable, though no shared thread was free
    finally:
        hung.set()
        await asyncio.gather(*stuck)
        await writer.close()
        shared.shutdown()
        spool.close()


class _SlowSpool(AuditSpool):
    """A real spool whose fsync'd write takes ``delay`` seconds (a slow disk)."""

    delay = 0.3

    def put(self, events, voids=(), **spend_marks):
        import time
        time.sleep(self.delay)
        return super().put(events, voids, **spend_marks)


async def test_check_latency_includes_the_wait_for_the_audit_spool(tmp_path):
    """rpcauthz_decision_seconds is the time to answer, and the answer waits for the spool."""
    import time

    from envoy.service.auth.v3 import external_auth_pb2
    from google.protobuf import struct_pb2

    from extauthz.config import load_settings
    from extauthz.pipeline import Authorizer
    from extauthz.spooled_audit import SpooledAuditWriter
    from policy import Grant, GrantSet, Mode, Role
    from reflection_cache.types import ServiceModes
    from tests.support.extauthz_doubles import FixedGrants, FreshModes

    svc = "a.v1.S"
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    spool = _SlowSpool(str(tmp_path / "spool.db"), max_events=1000)
    metrics = Metrics()
    writer = SpooledAuditWriter(store, metrics, spool, 100)
    writer.start()
    authz = Authorizer(load_settings(env={}, overrides={"store_url": "memory:"}), store=store,
                       grants=FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)])),
                       modes=FreshModes({svc: ServiceModes(svc, {"M": Mode.ENGINEERS_WITHOUT_APPROVAL})}),
                       audit=writer, metrics=metrics)
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.path, req.attributes.request.http.method = f"/{svc}/M", "POST"
    payload = struct_pb2.Struct()
    payload.update({"jwt_payload": {"sub": "alice", "iss": "x"}})
    req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    try:
        started = time.perf_counter()
        resp = await authz.check(req)
        took = time.perf_counter() - started
        assert resp.status.code == 0 and took >= _SlowSpool.delay
        get = metrics.registry.get_sample_value
        assert get("rpcauthz_decision_seconds_count", {"outcome": "allow"}) == 1
        observed = get("rpcauthz_decision_seconds_sum", {"outcome": "allow"})
        assert _SlowSpool.delay <= observed <= took
    finally:
        await writer.close()
        spool.close()
        store.close()


def test_spool_fsync_false_commits_without_fsync_and_keeps_what_it_committed(tmp_path):
    """``audit.spool_fsync: false`` is SQLite synchronous=NORMAL (WAL): no fsync per commit; the
    events are in the file for the next opener all the same (a kill -9 keeps them)."""
    for fsync, level in ((True, 2), (False, 1)):
        path = str(tmp_path / f"spool-{fsync}.db")
        spool = AuditSpool(path, max_events=10, fsync=fsync)
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == level
        spool.put(_events(3, tag=str(fsync)))
        again = AuditSpool(path, max_events=10)  # another connection, as after a restart
        assert [e.detail["decision_id"] for e in again.oldest(10)] == [f"{fsync}{i}" for i in range(3)]
        again.close()
        spool.close()


def test_spool_sync_bench_prints_each_variant_against_the_shipped_spool(tmp_path):
    """bench/spool_sync_bench.py still runs (a few writes per variant), so it cannot rot."""
    import re
    import subprocess
    import sys

    from devstack.processes import REPO_ROOT

    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "spool_sync_bench.py"), "--writes", "5",
                        "--rounds", "2", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| ([a-z-]+) \| \d+ \| \d+-\d+ \| \d+ \| (\d+\.\d\d)x \| \d+\.\d\dx \|$", r.stdout, re.M)
    assert [name for name, _ in rows] == ["sqlite-full", "sqlite-normal", "append-fdatasync",
                                          "prealloc-fdatasync", "prealloc-odsync"], r.stdout
    assert rows[0][1] == "1.00"


def test_lock_files_of_owners_gone_without_intents_are_removed(tmp_path):
    """A process that died holding no spend intent leaves only its lock file; the next sweep
    removes it (and voids nothing), while a live owner's lock file and intents stay."""
    import os

    path = str(tmp_path / "spool.db")
    live = AuditSpool(path, 100)
    live.claim_intents()
    live.put([], intents=["live-decision"])
    dead = AuditSpool(path, 100)
    dead.claim_intents()
    os.close(dead._owner_lock)  # what the kernel does for a killed process
    dead._owner_lock = None
    dead_file, live_file = f"{path}.intents-{dead.owner}.lock", f"{path}.intents-{live.owner}.lock"
    assert os.path.exists(dead_file)

    sweeper = AuditSpool(path, 100)
    own_file = f"{path}.intents-{sweeper.claim_intents()}.lock"
    assert sweeper.void_orphaned_intents() == 0
    assert not os.path.exists(dead_file)
    assert os.path.exists(live_file) and os.path.exists(own_file)
    assert sweeper.stats()["spend_intents"] == 1 and sweeper.voids(10) == []
    # A new owner can still claim (and keep) its lock after sweeps.
    late = AuditSpool(path, 100)
    late_file = f"{path}.intents-{late.claim_intents()}.lock"
    sweeper.void_orphaned_intents()
    assert os.path.exists(late_file)
    for s in (late, sweeper, live, dead):
        s.close()
    assert not os.path.exists(live_file) and not os.path.exists(own_file)


def _legacy_row(e: AuditEvent) -> str:
    """A spool row as the versions before ``event_json`` wrote it."""
    import json
    return json.dumps({"kind": e.kind, "actor": e.actor, "at": e.at.isoformat(), "request_id": e.request_id,
                       "service": e.service, "method": e.method, "outcome": e.outcome, "reason": e.reason,
                       "detail": e.detail, "trace_id": e.trace_id, "id": e.id})


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_row_a_spool_ever_held_ships_with_every_field(backend, tmp_path, request):
    """Rows an older version spooled (another JSON form, a time in another zone), rows that are
    not JSON to a database (NaN in detail) and canonical rows, mixed in one batch or not: each
    reaches the store once with every field, and leaves the spool."""
    import math
    from datetime import timedelta, timezone

    from extauthz.audit_spool import event_json, is_canonical

    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    store = open_store(url)
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=100)
    try:
        plus2 = timezone(timedelta(hours=2))
        old = [dataclasses_replace(e, at=e.at.astimezone(plus2)) for e in _events(3, tag="old")]
        nan = dataclasses_replace(_events(1, tag="nan")[0], detail={"decision_id": "nan", "x": math.inf})
        new = _events(4, tag="new")
        odd = [nan] if backend == "sqlite" else []  # PostgreSQL's JSON refuses it, whichever the path
        assert not is_canonical(event_json(nan)) and all(is_canonical(event_json(e)) for e in new)
        assert not any(is_canonical(_legacy_row(e)) for e in old)
        spool.put([], rows=[(e.id, _legacy_row(e)) for e in old])  # as an older version left them
        spool.put(new[:2] + odd)
        assert spool.ship(store, 2) == 5 + len(odd)  # batches of 2: mixed and not
        spool.put(new[2:], rows=[(old[0].id, _legacy_row(old[0]))])  # a resent one: stored once
        assert spool.ship(store, 500) == 3 and spool.stats()["depth"] == 0
        got = {e.id: e for e in store.list_audit(limit=10_000) if e.id in {x.id for x in old + new + [nan]}}
        for e in old + new:
            assert got[e.id] == dataclasses_replace(e, at=e.at.astimezone(UTC))
        if backend == "sqlite":
            assert got[nan.id].detail["x"] == math.inf
    finally:
        spool.close()
        store.close()


def test_encoded_rows_count_in_the_spools_bound_and_the_writers_queue(tmp_path):
    from extauthz.audit_spool import event_json
    from extauthz.spooled_audit import SpooledAuditWriter

    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=10)
    events = _events(14)
    assert spool.put(events[:4], rows=[(e.id, event_json(e)) for e in events[4:]]) == 10
    assert [e.id for e in spool.oldest(20)] == [e.id for e in events[:10]]

    async def main() -> Metrics:
        metrics = Metrics()
        store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        big = AuditSpool(str(tmp_path / "big.db"), max_events=1000)
        writer = SpooledAuditWriter(store, metrics, big, queue_size=5, replay_interval=60)
        writer.start()
        try:
            sent = _events(7, tag="q")
            writer.submit(sent[0])
            writer.submit_rows([(e.id, event_json(e)) for e in sent[1:]])  # 4 fit, 2 dropped
            writer.submit(sent[0])  # the group is full
            await writer.acknowledged()
            writer.submit_rows([(e.id, event_json(e)) for e in sent[5:]])  # a new group: room again
            await writer.acknowledged()
        finally:
            await writer.close()
            big.close()
        assert sorted(e.id for e in store.list_audit()) == sorted(e.id for e in sent)
        store.close()
        return metrics

    metrics = asyncio.run(main())
    assert metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "queue_full"}) == 3
    spool.close()


def test_a_busy_interpreter_does_not_starve_the_spools_shipping(tmp_path):
    """Shipping beside a thread that keeps the interpreter busy (a loaded server's checks):
    the spool's read and the SQLite store's write each take one statement step per batch.
    One step per row waited for the interpreter lock again after every row (5,000 events:
    77 s here, so a busy server's spool filled faster than it drained); now ~1 s. Bound: 20 s."""
    from tests.support.busy_interpreter import beside_busy_thread

    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    spool = AuditSpool(str(tmp_path / "spool.db"), max_events=10_000, fsync=False)
    events = _events(5000, tag="busy")
    spool.put(events)
    try:
        shipped = beside_busy_thread(lambda: spool.ship(store, 500), timeout=20)
        assert shipped == [5000], "shipping 5,000 spooled events took over 20 s beside a busy thread"
        assert {e.id for e in store.list_audit(limit=10_000)} >= {e.id for e in events}
    finally:
        spool.close()
        store.close()
