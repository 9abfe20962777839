"""The store goes away (the relay in front of PostgreSQL is cut) or hangs (the relay accepts and
forwards nothing) while a mixed load runs through the gateway: engineers' plain calls (decided
from the grants in memory), a non-engineer's and a non-contributor's calls (must be refused)
and approval-mode calls on an approved request with ``max_uses``.

Goals: zero wrong allows; every decision answered is audited exactly once (the audit spool
carries the events across the fault); no check answered before its event was in the spool
(the server logs each time it had to); approval uses spent equal the calls that passed with
that approval.
"""
from __future__ import annotations

import pathlib
import time

import grpc

from extauthz.spooled_audit import LATE_ACK_LOG
from tests.e2e.conftest import CONTRIB2, ENGINEER, NONENG, OTHER, cast_grants
from tests.support.faults.approvals import approved_request, uses_spent
from tests.support.faults.audit_count import decisions_answered, tally
from tests.support.faults.load import ALLOW, APPROVAL, DENY, Caller, MixedLoad
from tests.support.faults.outcome import ScenarioResult
from tests.support.faults.pg import relayed
from tests.support.gateway_harness import ACCOUNTS, GatewayStack, seed_grants

LIST, READ, CLOSE = (f"/{ACCOUNTS}/{m}" for m in ("ListAccounts", "ReadAccount", "CloseAccount"))
#: More uses than any bounded run can spend: spent must equal passed, not hit the cap.
MAX_USES = 100_000
#: Goal names (the hang's "uses spent" goal depends on branch trust's fix).
ZERO_WRONG, AUDIT_ONCE, USES_MATCH = ("zero wrong allows", "every decision audited exactly once",
                                      "uses spent = calls passed")
DURABLE_FIRST = "no check answered before its event was spooled"


def mixed_callers(gw: GatewayStack, *, engineer_threads: int = 2, approval_threads: int = 1) -> list[Caller]:
    return [
        Caller("engineer ListAccounts", LIST, gw.token(ENGINEER), ALLOW, threads=engineer_threads, pause=0.01),
        Caller("non-engineer ListAccounts", LIST, gw.token(NONENG), DENY, pause=0.02),
        Caller("non-contributor CloseAccount", CLOSE, gw.token(ENGINEER), DENY, pause=0.05),
        Caller("approved ReadAccount", READ, gw.token(OTHER), APPROVAL, threads=approval_threads, pause=0.02),
    ]


def store_outage(workdir: pathlib.Path, pg_dsn: str, *, seconds: float = 30.0) -> ScenarioResult:
    """The relay in front of PostgreSQL is cut for ``seconds``, then restored."""
    return _store_fault(workdir, pg_dsn, "unreachable", seconds)


def store_hang(workdir: pathlib.Path, pg_dsn: str, *, seconds: float = 10.0) -> ScenarioResult:
    """The relay holds every connection and forwards nothing for ``seconds``, then resumes.
    Twenty callers of the approval-mode method: during the hang each of their calls holds a
    thread of the server's store executor (16) for the whole hang, so the executor is full and
    the audit spool must not depend on it."""
    return _store_fault(workdir, pg_dsn, "hung", seconds, approval_threads=20)


def _store_fault(workdir: pathlib.Path, pg_dsn: str, how: str, seconds: float,
                 approval_threads: int = 1) -> ScenarioResult:
    result = ScenarioResult(f"store {how} {seconds:g} s (relay in front of PostgreSQL)")
    seed_grants(pg_dsn, cast_grants())
    rid = approved_request(pg_dsn, requester=OTHER, approver=CONTRIB2, service=ACCOUNTS,
                           method="ReadAccount", max_uses=MAX_USES)
    with relayed(pg_dsn) as (proxy, via_relay), \
            GatewayStack(workdir, store_url=via_relay,
                         extauthz={"audit.spool_path": str(workdir / "audit-spool.db"),
                                   "audit.replay_interval_s": 0.5}) as gw:
        load = MixedLoad(gw.gateway, mixed_callers(gw, approval_threads=approval_threads))
        with load:
            # Every caller answered as expected for a second (the approval fetched, the grants
            # loaded) before the fault.
            load.wait_expected(time.monotonic(), within=20.0)
            fault_start = time.monotonic()
            proxy.stop() if how == "unreachable" else proxy.hang()
            time.sleep(seconds)
            proxy.start() if how == "unreachable" else proxy.resume()
            fault_end = time.monotonic()
            load.wait_expected(fault_end, within=20.0)
            time.sleep(2.0)
        decided = decisions_answered(gw, load.calls())
        audit = tally(decided, pg_dsn)
        spent = uses_spent(pg_dsn, rid)
        late = gw.extauthz.output().count(LATE_ACK_LOG) if gw.extauthz else -1
    passed = load.count(grpc.StatusCode.OK, "approved ReadAccount")
    during = [c for t, c in load.results("engineer ListAccounts") if fault_start <= t < fault_end]
    result.calls = load.calls()
    result.wrong_allows = load.wrong_allows() + max(0, passed - spent)
    result.unavailable = load.count(grpc.StatusCode.UNAVAILABLE)
    result.recovery_s = load.recovery_s(fault_start, fault_end)
    result.audit_expected, result.audit_written, result.audit_duplicated = (
        audit.expected, audit.written, audit.duplicated)
    result.uses_spent, result.uses_passed = spent, passed
    result.detail += [
        f"answers by caller: {load.summary()}",
        f"engineers' plain calls during the fault: {len(during)}, "
        f"{sum(c is grpc.StatusCode.OK for c in during)} OK (decided from the grants in memory)",
        f"decisions in Envoy's access log: {len(decided)}; missing from the audit: {len(audit.missing)} "
        f"{audit.missing[:3]}; audited more than once: {len(audit.duplicates)} {audit.duplicates[:3]}",
        f"approval {rid}: {spent} uses spent, {passed} calls passed with it",
        f"back to expected answers {result.recovery_s:.1f} s after the store returned",
    ]
    result.goal(ZERO_WRONG, result.wrong_allows == 0, f"{result.wrong_allows} of {result.calls}")
    result.goal("a load was really sent", result.calls >= 100 and len(decided) >= 100,
                f"{result.calls} calls, {len(decided)} decisions")
    result.goal(AUDIT_ONCE, audit.exactly_once,
                f"{audit.expected} expected, {audit.written} written, {audit.duplicated} duplicated")
    result.goal(DURABLE_FIRST, late == 0, f"the server logged {LATE_ACK_LOG!r} {late} time(s)")
    result.goal(USES_MATCH, spent == passed, f"{spent} spent, {passed} passed")
    return result

