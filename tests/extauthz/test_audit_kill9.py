"""kill -9 loses no acknowledged decision (issue 9, finding 4): the server, a real process on
PostgreSQL with the audit spool (on by default), answers N checks, is killed with SIGKILL
while their events are still inside the batch window (2 s), and is started again on the same
spool: every one of the N decisions is then in the store's audit exactly once."""
from __future__ import annotations

import collections
import re
import signal
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from devstack.processes import ExtAuthzProcess
from policy import Grant, Role
from policy.stores import open_store
from tests.extauthz.test_server import _config, check_request, demo_upstream  # noqa: F401 (fixture)
from tests.support.gateway_harness import seed_grants

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N = 40


def _decision_id(resp) -> str:
    found = re.search(r"[0-9a-f]{32}", str(resp))
    assert found, resp
    return found.group(0)


def _audited(store_url: str) -> collections.Counter[str]:
    store = open_store(store_url)
    try:
        return collections.Counter(e.detail.get("decision_id") for e in store.list_audit(limit=10_000)
                                   if e.kind.startswith("decision."))
    finally:
        store.close()


@pytest.mark.parametrize("spool_fsync", [True, False], ids=["fsync", "no-fsync"])
def test_kill_9_after_answers_loses_no_decision_audit(tmp_path, pg_dsn, demo_upstream, spool_fsync):  # noqa: F811
    """Also with ``audit.spool_fsync: false``: a kill -9 of the process (not of the host) keeps
    what the spool committed, since the OS holds it."""
    cfg = _config(tmp_path, demo_upstream)
    cfg.update(store_url=pg_dsn, audit={"batch_window_ms": 2000, "spool_path": str(tmp_path / "spool.db"),
                                        "spool_fsync": spool_fsync})
    seed_grants(pg_dsn, [Grant("alice", Role.ENGINEER)])
    proc = ExtAuthzProcess(cfg, tmp_path).wait_ready()
    decided: list[str] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            for i in range(N):
                resp = stub.Check(check_request(principal="alice" if i % 4 else "mallory"), timeout=5)
                decided.append(_decision_id(resp))
        assert ("AUDIT SPOOL WITHOUT FSYNC" in proc.output()) is not spool_fsync
        proc.signal(signal.SIGKILL)  # well inside the 2 s batch window
        proc.proc.wait(10)
    finally:
        proc.stop()
    assert len(set(decided)) == N
    before = _audited(pg_dsn)
    assert sum(before[d] for d in decided) < N, "the window was already written: the test proves nothing"

    again = ExtAuthzProcess(cfg, tmp_path, name="extauthz-again").wait_ready()
    try:
        deadline = time.monotonic() + 20
        while sum(_audited(pg_dsn)[d] for d in decided) < N and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        again.stop()
    audited = _audited(pg_dsn)
    assert {d: audited[d] for d in decided} == {d: 1 for d in decided}
