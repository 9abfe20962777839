"""Spend and answer agree even when the store hangs *during* the commit of a spend (issue 9).

The check spends an approval use; the spend's COMMIT is held in a TCP relay in front of the
real PostgreSQL until the check's deadline has passed and it answered 503. Whether the COMMIT
then arrives late (the use is committed after the 503) or never (the connection is cut, the
server rolls back), the void the check spooled before answering makes the store end with
uses spent == calls allowed, and the audit holds exactly one decision event per check.
SQLite has the same race (a COMMIT whose fsync stalls past the deadline), shown in-process.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format, struct_pb2
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import policy
from devstack.processes import free_port
from extauthz.audit_spool import AuditSpool
from extauthz.audit_writer import AuditWriter
from extauthz.config import load_settings
from extauthz.metrics import Metrics
from extauthz.pipeline import Authorizer
from extauthz.spooled_audit import SpooledAuditWriter
from policy import Grant, GrantSet, Mode, Role, Target
from policy.stores import open_store
from reflection_cache.types import ServiceModes
from tests.support.extauthz_doubles import FixedGrants, StaticModes
from tests.support.store_tcp_proxy import TcpProxy

SVC = "rpcauthz.demo.v1.Accounts"
MODES = {"Read": Mode.ENGINEERS_WITH_APPROVAL}
GRANTS = GrantSet([Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)])


def _approved(store) -> policy.ApprovalRequest:
    now = datetime.now(UTC)
    r = policy.open_request(request_id=f"r{time.time_ns()}", requester="alice", target=Target(SVC, "Read"),
                            mode=Mode.ENGINEERS_WITH_APPROVAL, grants=GRANTS, now=now, max_uses=1)
    return store.create_request(policy.approve(r, "bob", GRANTS, now), actor="alice")


def _request() -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.path, req.attributes.request.http.method = f"/{SVC}/Read", "POST"
    payload = struct_pb2.Struct()
    payload.update({"jwt_payload": {"sub": "alice", "iss": "x"}})
    req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    return req


def _decision_id(resp: external_auth_pb2.CheckResponse) -> str:
    return str(json_format.MessageToDict(resp.dynamic_metadata)["decision_id"])


def _decision_events(store, decision_id: str) -> list[str]:
    return [e.kind for e in store.list_audit(limit=10_000) if e.kind.startswith("decision.")
            and (e.detail or {}).get("decision_id") == decision_id]


def _ledger(store, request_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.detail["decision_id"]) for e in
            store.list_audit(request_id=request_id, kinds=["request.used", "request.use_voided"])]


async def _until(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _authorizer(store, audit, metrics, executor) -> Authorizer:
    settings = load_settings(env={}, overrides={"store_url": "memory:", "decision_deadline_ms": 700})
    return Authorizer(settings, store=store, grants=FixedGrants(GRANTS),
                      modes=StaticModes({SVC: ServiceModes(SVC, MODES)}), audit=audit,
                      metrics=metrics, executor=executor)


@pytest.mark.postgres
@pytest.mark.parametrize("commit", ["arrives_late", "never_arrives"])
async def test_spend_whose_commit_hangs_past_the_deadline_is_voided(pg_dsn, tmp_path, commit):
    params = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432), free_port())
    proxy.start()
    direct = open_store(pg_dsn)
    store = open_store(make_conninfo(pg_dsn, host="127.0.0.1", port=str(proxy.port)), connect_timeout=2)
    executor = ThreadPoolExecutor(8)
    spool = AuditSpool(str(tmp_path / "spool.db"), 10_000)
    metrics = Metrics()
    audit = SpooledAuditWriter(store, metrics, spool, 100, executor, replay_interval=0.2)
    audit.start()
    authz = _authorizer(store, audit, metrics, executor)
    trap = None
    try:
        r = _approved(direct)
        trap = proxy.trap(b"INSERT INTO spends", b"COMMIT")
        started = time.monotonic()
        resp = await authz.check(_request())
        assert resp.denied_response.status.code == 503 and "deadline" in resp.denied_response.body
        assert time.monotonic() - started < 3
        assert trap.sprung.is_set()  # the spend's COMMIT is what hung
        decision = _decision_id(resp)
        assert spool.stats()["spend_voids"] == 1  # on disk before the 503 went out
        if commit == "arrives_late":
            trap.release()  # PostgreSQL commits the use now, after the caller got 503
        else:
            trap.cut()      # PostgreSQL never sees the COMMIT and rolls back
        await _until(lambda: spool.stats()["spend_voids"] == 0 and spool.stats()["depth"] == 0)
        assert direct.get_request(r.id).uses == 0
        expected = [("request.used", decision), ("request.use_voided", decision)] \
            if commit == "arrives_late" else []
        assert _ledger(direct, r.id) == expected
        assert _decision_events(direct, decision) == ["decision.error"]
        given_back = metrics.approval_uses_given_back._value.get()
        assert given_back == (1 if commit == "arrives_late" else 0)

        # The approval is still there for one call, and that call is the one use spent.
        ok = await authz.check(_request())
        assert ok.status.code == 0
        assert direct.get_request(r.id).uses == 1
        again = _decision_id(ok)
        await _until(lambda: _decision_events(direct, again) == ["decision.allow_with_approval"])
        assert _ledger(direct, r.id)[len(expected):] == [("request.used", again)]
    finally:
        if trap is not None:
            trap.release()
        await audit.close()
        spool.close()
        store.close()
        direct.close()
        proxy.stop()
        executor.shutdown(wait=False, cancel_futures=True)


class _CommitsLate:
    """The real SQLite store, but a spend's commit is acknowledged late (a stalled fsync)."""

    def __init__(self, store, late: float) -> None:
        self._store, self.late = store, late

    def __getattr__(self, name):
        return getattr(self._store, name)

    def spend_use(self, *args, **kwargs):
        done = self._store.spend_use(*args, **kwargs)
        time.sleep(self.late)
        return done


async def test_sqlite_spend_acknowledged_after_the_deadline_is_given_back(tmp_path):
    """Same race on SQLite, with the spool off (the in-memory void path)."""
    store = open_store(f"sqlite:///{tmp_path / 'rpcauthz.db'}")
    executor = ThreadPoolExecutor(4)
    metrics = Metrics()
    audit = AuditWriter(store, metrics, 100, executor, replay_interval=0.2)
    audit.start()
    authz = _authorizer(_CommitsLate(store, late=1.2), audit, metrics, executor)
    try:
        r = _approved(store)
        resp = await authz.check(_request())
        assert resp.denied_response.status.code == 503
        decision = _decision_id(resp)
        await _until(lambda: _ledger(store, r.id) == [("request.used", decision),
                                                      ("request.use_voided", decision)])
        assert store.get_request(r.id).uses == 0
        assert metrics.approval_uses_given_back._value.get() == 1
        await _until(lambda: _decision_events(store, decision) == ["decision.error"])
        authz.store = store
        ok = await authz.check(_request())
        assert ok.status.code == 0 and store.get_request(r.id).uses == 1
    finally:
        await audit.close()
        store.close()
        executor.shutdown(wait=False, cancel_futures=True)


async def test_an_allow_settles_its_spend_intent_so_a_restart_voids_nothing(tmp_path):
    """The intent is on disk before the spend and gone with the allow's events: a new process
    on the spool (same file, another owner) gives nothing back; an intent left by a process
    that is gone is voided, one of a live process sharing the spool is not."""
    store = open_store(f"sqlite:///{tmp_path / 'rpcauthz.db'}")
    executor = ThreadPoolExecutor(4)
    path = str(tmp_path / "spool.db")
    spool = AuditSpool(path, 10_000)
    metrics = Metrics()
    audit = SpooledAuditWriter(store, metrics, spool, 100, executor, replay_interval=0.2)
    audit.start()
    authz = _authorizer(store, audit, metrics, executor)
    seen: list[float] = []
    spend = store.spend_use
    store.spend_use = lambda *a, **k: (seen.append(spool.stats()["spend_intents"]), spend(*a, **k))[1]
    try:
        r = _approved(store)
        ok = await authz.check(_request())
        assert ok.status.code == 0 and seen == [1.0]  # recorded before the spend was sent
        assert spool.stats()["spend_intents"] == 0    # settled with the allow's events
    finally:
        await audit.close()
        spool.close()
    live = AuditSpool(path, 10_000)  # a live process sharing the spool, mid-spend
    live.claim_intents()
    live.put([], intents=["live-decision"])
    gone = AuditSpool(path, 10_000)  # a process killed mid-spend (its lock is gone with it)
    gone.claim_intents()
    gone.put([], intents=["gone-decision"])
    import fcntl
    import os
    os.close(gone._owner_lock)  # what the kernel does for a killed process
    gone._owner_lock = None
    restarted = AuditSpool(path, 10_000)
    again = SpooledAuditWriter(store, metrics, restarted, 100, executor, replay_interval=0.2)
    again.start()
    try:
        assert restarted.voids(10) == ["gone-decision"]
        await _until(lambda: restarted.stats()["spend_voids"] == 0)
        assert store.get_request(r.id).uses == 1  # the allowed call's use stays spent
        assert _ledger(store, r.id) == [("request.used", _decision_id(ok))]
        assert restarted.stats()["spend_intents"] == 1  # the live process's, untouched
        fd = os.open(f"{path}.intents-{live.owner}.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held by its owner
        finally:
            os.close(fd)
        live.close()  # it stops: its unsettled intent becomes a void at the next round
        await _until(lambda: restarted.stats()["spend_intents"] == 0 and restarted.stats()["spend_voids"] == 0)
    finally:
        await again.close()
        restarted.close()
        gone.close()
        store.close()
        executor.shutdown(wait=False, cancel_futures=True)


async def test_a_spend_intent_the_spool_cannot_write_means_no_spend_and_a_503(tmp_path):
    """Fail closed: no durable intent, no spend (and so no allow through the approval)."""
    store = open_store(f"sqlite:///{tmp_path / 'rpcauthz.db'}")
    executor = ThreadPoolExecutor(4)

    class BrokenSpool(AuditSpool):
        def put(self, events, voids=(), **marks):
            if marks.get("intents"):
                raise OSError("disk full")
            return super().put(events, voids, **marks)

    spool = BrokenSpool(str(tmp_path / "spool.db"), 10_000)
    metrics = Metrics()
    audit = SpooledAuditWriter(store, metrics, spool, 100, executor, replay_interval=0.2)
    audit.start()
    authz = _authorizer(store, audit, metrics, executor)
    try:
        r = _approved(store)
        resp = await authz.check(_request())
        assert resp.denied_response.status.code == 503
        assert store.get_request(r.id).uses == 0 and _ledger(store, r.id) == []
    finally:
        await audit.close()
        spool.close()
        store.close()
        executor.shutdown(wait=False, cancel_futures=True)
