"""Two ext_authz replicas on one PostgreSQL behind real Envoy (envoy/gateway.yaml's health
checks, outlier detection and retry policy): kill -9 of one under load, and a rolling restart.

Goals: zero wrong allows; a kill costs at most ~1% of calls, the dead replica is out of
rotation within 5 s and failures stop within 5 s; a rolling restart costs no call.
"""
from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable

import grpc

from tests.e2e.conftest import ENGINEER, NONENG, cast_grants
from tests.support.faults.load import ALLOW, DENY, Caller, MixedLoad
from tests.support.faults.outcome import ScenarioResult
from tests.support.gateway_harness import ACCOUNTS, GatewayStack

LIST = f"/{ACCOUNTS}/ListAccounts"


def wait_until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``predicate()`` held; AssertionError naming ``what`` after ``within``."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {within}s")


def _callers(gw: GatewayStack) -> list[Caller]:
    return [Caller("engineer ListAccounts", LIST, gw.token(ENGINEER), ALLOW, threads=4),
            Caller("non-engineer ListAccounts", LIST, gw.token(NONENG), DENY, pause=0.02)]


def replica_kill9(workdir: pathlib.Path, pg_dsn: str, *, after_s: float = 4.0) -> ScenarioResult:
    """kill -9 of replica 1 of 2 under load; the load runs ``after_s`` more after it left rotation."""
    r = ScenarioResult("kill -9 of one of 2 replicas")
    with GatewayStack(workdir, store_url=pg_dsn, grants=cast_grants(), replicas=2) as gw:
        wait_until(lambda: gw.healthy_replicas() == 2, 20, "both replicas healthy")
        with MixedLoad(gw.gateway, _callers(gw)) as load:
            time.sleep(3)
            victim = gw.replicas[1]
            assert victim is not None
            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            out_after = wait_until(lambda: gw.healthy_replicas() == 1, 10, "the dead replica out of rotation")
            time.sleep(after_s)
    everything = load.results()
    failed = [t for t, code in everything if code not in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED)]
    r.calls, r.wrong_allows = len(everything), load.wrong_allows()
    r.unavailable = load.count(grpc.StatusCode.UNAVAILABLE)
    r.recovery_s = load.recovery_s(killed_at, killed_at)
    engineer_denied = load.count(grpc.StatusCode.PERMISSION_DENIED, "engineer ListAccounts")
    r.detail += [f"answers by caller: {load.summary()}",
                 f"{len(load.loads['engineer ListAccounts'].between(killed_at))} engineer calls after the kill; "
                 f"out of rotation after {out_after:.1f} s; last failure {r.recovery_s:.1f} s after the kill"]
    r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls}")
    r.goal("a load was really sent", r.calls >= 100, str(r.calls))
    r.goal("engineers never refused", engineer_denied == 0, str(engineer_denied))
    r.goal("at most ~1% of calls failed", len(failed) <= max(1, r.calls // 100),
           f"{len(failed)} of {r.calls} ({len(failed) / max(1, r.calls):.2%})")
    r.goal("out of rotation within 5 s", out_after <= 5.0, f"{out_after:.1f} s")
    r.goal("failures stopped within 5 s", not failed or max(failed) - killed_at <= 5.0, f"{r.recovery_s:.1f} s")
    return r


def rolling_restart(workdir: pathlib.Path, pg_dsn: str, *, drain_notice_s: float = 3.0) -> ScenarioResult:
    """SIGTERM, restart, wait healthy, next: both replicas, under load.

    The shipped drain notice (5 s) is above Envoy's 2 x 1 s health checks; the default here is
    shorter only to keep the run short, still above them."""
    r = ScenarioResult("rolling restart of 2 replicas")
    with GatewayStack(workdir, store_url=pg_dsn, grants=cast_grants(), replicas=2,
                      extauthz={"drain_notice_s": drain_notice_s}) as gw:
        wait_until(lambda: gw.healthy_replicas() == 2, 20, "both replicas healthy")
        with MixedLoad(gw.gateway, _callers(gw)) as load:
            time.sleep(2)
            started = time.monotonic()
            for i in range(2):
                proc = gw.replicas[i]
                assert proc is not None
                code = proc.stop(timeout=20)
                assert code == 0, f"replica {i} exited {code}:\n{proc.output()[-3000:]}"
                gw.start_replica(i)
                wait_until(lambda: gw.healthy_replicas() == 2, 20, f"replica {i} back in rotation")
            took = time.monotonic() - started
            time.sleep(2)
    r.calls, r.wrong_allows = load.calls(), load.wrong_allows()
    r.unavailable = load.count(grpc.StatusCode.UNAVAILABLE)
    unexpected = load.unexpected_after(0)
    r.recovery_s = load.recovery_s(started, started + took)
    r.detail += [f"answers by caller: {load.summary()}", f"both replicas restarted in {took:.1f} s"]
    r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls}")
    r.goal("a load was really sent", r.calls >= 100, str(r.calls))
    r.goal("no call failed", unexpected == 0, f"{unexpected} of {r.calls}")
    return r
