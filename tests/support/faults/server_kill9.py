"""kill -9 of the ext_authz server inside its audit batch window, then a restart on the same
spool (PostgreSQL): every decision answered before the kill is audited exactly once."""
from __future__ import annotations

import pathlib
import re
import signal
import time

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from devstack.demo_services import start_demo_server
from devstack.processes import ExtAuthzProcess, free_port
from policy import Grant, Role
from tests.support.extauthz_doubles import check_request
from tests.support.faults.audit_count import audited_decisions
from tests.support.faults.outcome import ScenarioResult
from tests.support.gateway_harness import ACCOUNTS, extauthz_config, seed_grants

AUDIT_ONCE = "every decision audited exactly once"


def _decision_id(resp: object) -> str:
    found = re.search(r"[0-9a-f]{32}", str(resp))
    if not found:
        raise AssertionError(f"no decision id in {resp}")
    return found.group(0)


def server_kill9(workdir: pathlib.Path, pg_dsn: str, *, checks: int = 40,
                 spool_fsync: bool = True) -> ScenarioResult:
    """``checks`` Checks (3 in 4 allowed, the rest denied) answered, kill -9 well inside the 2 s
    batch window, restart on the same spool, count the audit. ``spool_fsync=False`` runs it with
    ``audit.spool_fsync: false``: a kill -9 of the process (not of the host) keeps what the spool
    wrote, since the OS holds it."""
    r = ScenarioResult("kill -9 of the server inside its audit window, restarted")
    upstream = start_demo_server(services=("accounts",))
    try:
        cfg = extauthz_config(port=free_port(), store_url=pg_dsn,
                              reflection_static={ACCOUNTS: upstream.address},
                              extra={"audit.batch_window_ms": 2000,
                                     "audit.spool_path": str(workdir / "spool.db"),
                                     "audit.spool_fsync": spool_fsync})
        seed_grants(pg_dsn, [Grant("alice", Role.ENGINEER)])
        proc = ExtAuthzProcess(cfg, workdir).wait_ready()
        decided: list[str] = []
        codes: list[int] = []
        try:
            with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)
                for i in range(checks):
                    resp = stub.Check(check_request(principal="alice" if i % 4 else "mallory"), timeout=5)
                    codes.append(resp.status.code)
                    decided.append(_decision_id(resp))
            warned = "AUDIT SPOOL WITHOUT FSYNC" in proc.output()
            proc.signal(signal.SIGKILL)
            proc.proc.wait(10)
        finally:
            proc.stop()
        before = audited_decisions(pg_dsn)
        in_store_at_kill = sum(before[d] for d in decided)
        again = ExtAuthzProcess(cfg, workdir, name="extauthz-again").wait_ready()
        restarted = time.monotonic()
        try:
            deadline = restarted + 20
            while sum(audited_decisions(pg_dsn)[d] for d in decided) < checks and time.monotonic() < deadline:
                time.sleep(0.2)
            shipped_after = time.monotonic() - restarted
            time.sleep(0.5)
        finally:
            again.stop()
    finally:
        upstream.stop(grace=0)
    audited = audited_decisions(pg_dsn)
    wrong = sum(1 for i, c in enumerate(codes) if c == 0 and i % 4 == 0)
    r.calls, r.wrong_allows, r.recovery_s = checks, wrong, shipped_after
    r.audit_expected = len(set(decided))
    r.audit_written = sum(1 for d in set(decided) if audited[d])
    r.audit_duplicated = sum(1 for d in set(decided) if audited[d] > 1)
    r.detail += [f"{checks} Checks answered ({codes.count(0)} allowed); in the store at the kill: "
                 f"{in_store_at_kill}; all shipped {shipped_after:.1f} s after the restart"]
    r.goal("zero wrong allows", wrong == 0, str(wrong))
    r.goal("the start-up log says whether the spool fsyncs", warned is not spool_fsync,
           f"warning logged: {warned}")
    r.goal("the kill fell inside the batch window (else this proves nothing)", in_store_at_kill < checks,
           f"{in_store_at_kill} of {checks} in the store at the kill")
    r.goal(AUDIT_ONCE, r.audit_written == r.audit_expected == checks and r.audit_duplicated == 0,
           f"{r.audit_expected} / {r.audit_written} / {r.audit_duplicated}")
    return r


def _ledger(store_url: str, request_id: str) -> list[tuple[str, str]]:
    """The request's spends: (``request.used`` / ``request.use_voided``, decision id)."""
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        return [(e.kind, str((e.detail or {}).get("decision_id"))) for e in
                store.list_audit(request_id=request_id, kinds=["request.used", "request.use_voided"])]
    finally:
        store.close()


def server_kill9_mid_spend(workdir: pathlib.Path, pg_dsn: str, *, pause_s: float = 2.0) -> ScenarioResult:
    """An approval use spent, then the server killed -9 before the answer (the test-only
    ``RPCAUTHZ_TEST_PAUSE_AFTER_SPEND_S`` holds each check ``pause_s`` after its spend
    committed), then restarted on the same spool: the spend intent it left becomes a void, so
    the use is given back (``request.use_voided``) and uses spent == calls passed."""
    from extauthz.pipeline import PAUSE_AFTER_SPEND_ENV
    from tests.support.faults.approvals import approved_request, uses_spent

    r = ScenarioResult("kill -9 of the server between a spend's commit and its answer, restarted")
    upstream = start_demo_server(services=("accounts",))
    read = f"/{ACCOUNTS}/ReadAccount"
    try:
        cfg = extauthz_config(port=free_port(), store_url=pg_dsn,
                              reflection_static={ACCOUNTS: upstream.address},
                              extra={"audit.spool_path": str(workdir / "spool.db"),
                                     "audit.replay_interval_s": 0.2,
                                     "decision_deadline_ms": int((pause_s + 3) * 1000)})
        seed_grants(pg_dsn, [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)])
        rid = approved_request(pg_dsn, requester="alice", approver="bob", service=ACCOUNTS,
                               method="ReadAccount", max_uses=5)
        proc = ExtAuthzProcess(cfg, workdir, env={PAUSE_AFTER_SPEND_ENV: str(pause_s)}).wait_ready()
        codes: list[grpc.StatusCode] = []
        try:
            with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)
                first = stub.Check(check_request(read, principal="alice"), timeout=pause_s + 5)
                codes.append(grpc.StatusCode.OK if first.status.code == 0 else grpc.StatusCode.UNKNOWN)
                passed_id = _decision_id(first)
                second = stub.Check.future(check_request(read, principal="alice"), timeout=pause_s + 5)
                deadline = time.monotonic() + pause_s + 3
                while uses_spent(pg_dsn, rid) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                spent_at_kill = uses_spent(pg_dsn, rid)
                answered_before_kill = second.done()
                proc.signal(signal.SIGKILL)
                proc.proc.wait(10)
                try:
                    second.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
        finally:
            proc.stop()
        again = ExtAuthzProcess(cfg, workdir, name="extauthz-again").wait_ready()
        restarted = time.monotonic()
        try:
            deadline = restarted + 15
            while uses_spent(pg_dsn, rid) > 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            r.recovery_s = time.monotonic() - restarted
            logged = again.output()
        finally:
            again.stop()
    finally:
        upstream.stop(grace=0)
    ledger = _ledger(pg_dsn, rid)
    killed = [d for kind, d in ledger if kind == "request.used" and d != passed_id]
    r.calls = len(codes)
    r.unavailable = codes.count(grpc.StatusCode.UNAVAILABLE)
    r.uses_spent, r.uses_passed = uses_spent(pg_dsn, rid), codes.count(grpc.StatusCode.OK)
    r.detail += [f"uses spent at the kill: {spent_at_kill}; answers: {[c.name for c in codes]}; "
                 f"ledger: {[k for k, _ in ledger]}; use given back {r.recovery_s:.1f} s after the restart"]
    r.goal("the kill fell between the spend's commit and the answer (else this proves nothing)",
           spent_at_kill == 2 and not answered_before_kill and codes[1] is not grpc.StatusCode.OK,
           f"{spent_at_kill} uses spent at the kill, answered before it: {answered_before_kill}")
    r.goal("uses spent = calls passed", r.uses_spent == r.uses_passed == 1,
           f"{r.uses_spent} / {r.uses_passed}")
    r.goal("the killed check's use is given back (request.use_voided)",
           len(killed) == 1 and ("request.use_voided", killed[0]) in ledger, str(ledger))
    r.goal("the restart says it voided the spend", "voided" in logged and "never answered allow" in logged)
    return r
