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
