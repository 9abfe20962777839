"""The store goes away (the relay in front of PostgreSQL is cut), hangs (the relay accepts and
forwards nothing) or is alive but blocked (another session holds a lock on ``requests``) while
a mixed load runs through the gateway: engineers' plain calls (decided from the grants in
memory), a non-engineer's and a non-contributor's calls (must be refused) and approval-mode
calls on an approved request with ``max_uses``.

Goals: zero wrong allows; every decision answered is audited exactly once (the audit spool
carries the events across the fault); no check answered before its event was in the spool
(the server logs each time it had to); approval uses spent equal the calls that passed with
that approval. Blocked: no statement of the server waits on the lock longer than the server's
``store_statement_timeout_s`` (PostgreSQL cancels it), so its threads do not pile up behind it.
"""
from __future__ import annotations

import contextlib
import pathlib
import threading
import time
from collections.abc import Iterator

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


def store_outage_two_replicas(workdir: pathlib.Path, pg_dsn: str, *, seconds: float = 15.0) -> ScenarioResult:
    """As ``store_outage``, with two replicas behind Envoy, each with its own audit spool: each
    spools the decisions it answered and ships them when the store is back, and the uses
    both spend of one approval still equal the calls that passed."""
    return _store_fault(workdir, pg_dsn, "unreachable", seconds, approval_threads=2, replicas=2)


def store_hang(workdir: pathlib.Path, pg_dsn: str, *, seconds: float = 10.0) -> ScenarioResult:
    """The relay holds every connection and forwards nothing for ``seconds``, then resumes.
    Twenty callers of the approval-mode method: during the hang each of their calls holds a
    thread of the server's store executor (16) for the whole hang, so the executor is full and
    the audit spool must not depend on it."""
    return _store_fault(workdir, pg_dsn, "hung", seconds, approval_threads=20)


def store_locked(workdir: pathlib.Path, pg_dsn: str, *, seconds: float = 12.0,
                 statement_timeout_s: float = 5.0) -> ScenarioResult:
    """PostgreSQL answers, but another session holds ``LOCK TABLE requests IN ACCESS
    EXCLUSIVE MODE`` for ``seconds`` (a migration, a stuck transaction): every read and spend
    of an approval waits on it. The server's ``store_statement_timeout_s`` must end each such
    wait (the call fails closed) instead of holding a thread for the whole lock."""
    return _store_fault(workdir, pg_dsn, "locked", seconds, approval_threads=4,
                        statement_timeout_s=statement_timeout_s)


def spool_depths(gw: GatewayStack) -> list[int]:
    """Events waiting in each replica's audit spool (its ``/metrics``:
    ``rpcauthz_audit_spool_stat{stat="depth"}``)."""
    depths = [gw.server_stat("audit_spool", "depth", replica=i) for i in range(len(gw.replica_configs))]
    assert None not in depths, f"no spool depth on some replica's /metrics: {depths}"
    return [int(d) for d in depths if d is not None]


class _LockHeld:
    """``requests`` locked by a session of its own; meanwhile the longest wait on a lock of
    any of the server's sessions (``application_name`` rpcauthz) is sampled every 0.2 s."""

    def __init__(self, dsn: str) -> None:
        self.dsn, self.longest_wait_s, self.samples = dsn, 0.0, 0
        self._done = threading.Event()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        import psycopg
        with psycopg.connect(self.dsn) as locker, psycopg.connect(self.dsn, autocommit=True) as watcher:
            locker.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")  # in locker's transaction
            sampler = threading.Thread(target=self._sample, args=(watcher,), daemon=True)
            sampler.start()
            try:
                yield
            finally:
                self._done.set()
                sampler.join(5)
                locker.rollback()

    def _sample(self, conn) -> None:
        while not self._done.wait(0.2):
            row = conn.execute(
                "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0) "
                "FROM pg_stat_activity WHERE application_name = 'rpcauthz' AND wait_event_type = 'Lock' "
                "AND datname = current_database()").fetchone()
            self.longest_wait_s = max(self.longest_wait_s, float(row[0]))
            self.samples += 1


def _store_fault(workdir: pathlib.Path, pg_dsn: str, how: str, seconds: float,
                 approval_threads: int = 1, statement_timeout_s: float | None = None,
                 replicas: int = 1) -> ScenarioResult:
    where = "a session of its own holding a lock" if how == "locked" else "relay in front of PostgreSQL"
    result = ScenarioResult(f"store {how} {seconds:g} s ({where}{', 2 replicas' if replicas == 2 else ''})")
    extra = {} if statement_timeout_s is None else {"store_statement_timeout_s": statement_timeout_s}
    lock = _LockHeld(pg_dsn)
    depths_during: list[int] = []
    seed_grants(pg_dsn, cast_grants())
    rid = approved_request(pg_dsn, requester=OTHER, approver=CONTRIB2, service=ACCOUNTS,
                           method="ReadAccount", max_uses=MAX_USES)
    with relayed(pg_dsn) as (proxy, via_relay), \
            GatewayStack(workdir, store_url=via_relay, replicas=replicas,
                         extauthz={"audit.spool_path": str(workdir / "audit-spool.db"),
                                   "audit.replay_interval_s": 0.5, **extra}) as gw:
        load = MixedLoad(gw.gateway, mixed_callers(gw, approval_threads=approval_threads))
        with load:
            # Every caller answered as expected for a second (the approval fetched, the grants
            # loaded) before the fault.
            load.wait_expected(time.monotonic(), within=20.0)
            fault_start = time.monotonic()
            if how == "locked":
                with lock.held():
                    time.sleep(seconds)
            else:
                proxy.stop() if how == "unreachable" else proxy.hang()
                time.sleep(seconds)
                depths_during = spool_depths(gw)
                proxy.start() if how == "unreachable" else proxy.resume()
            fault_end = time.monotonic()
            load.wait_expected(fault_end, within=20.0)
            time.sleep(2.0)
        decided = decisions_answered(gw, load.calls())
        audit = tally(decided, pg_dsn)
        spent = uses_spent(pg_dsn, rid)
        outputs = [r.output() for r in gw.replicas if r is not None]
        late = sum(out.count(LATE_ACK_LOG) for out in outputs) if len(outputs) == replicas else -1
        depths_after = spool_depths(gw)
        drained_by = time.monotonic() + 10.0  # a batch shipped is removed from its spool just after
        while max(depths_after, default=0) > 0 and time.monotonic() < drained_by:
            time.sleep(0.2)
            depths_after = spool_depths(gw)
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
    if replicas > 1:
        result.detail.append(f"events in each replica's spool at the end of the outage: {depths_during}, "
                             f"after: {depths_after}")
        result.goal("every replica spooled its decisions while the store was away",
                    len(depths_during) == replicas and min(depths_during) > 0, str(depths_during))
        result.goal("every replica's spool shipped once the store was back",
                    len(depths_after) == replicas and max(depths_after) == 0, str(depths_after))
    if how == "locked":
        assert statement_timeout_s is not None
        result.detail.append(f"longest wait of a server statement on the lock: {lock.longest_wait_s:.1f} s "
                             f"({lock.samples} samples of pg_stat_activity)")
        result.goal("no statement waited on the lock past store_statement_timeout_s",
                    lock.samples >= 10 and lock.longest_wait_s <= statement_timeout_s + 1.5,
                    f"longest {lock.longest_wait_s:.1f} s against {statement_timeout_s:g} s, "
                    f"{lock.samples} samples")
        result.goal("approval calls reached the lock (the fault was real)",
                    lock.longest_wait_s >= 1.0, f"longest wait {lock.longest_wait_s:.1f} s")
    return result

