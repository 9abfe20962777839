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
from tests.support.gateway_harness import ACCOUNTS, FAST_PATH_ENVOYS, FAST_PATH_RESUMED, GatewayStack

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


def _kill_goals(r: ScenarioResult, load: MixedLoad, killed_at: float) -> list[float]:
    """What every kill under ``_callers``' load must show: the counts (``recovery_s`` from
    the kill), the answers, and the goals no wrong allow, a real load, engineers never
    refused, at most ~1% failed. The failed calls' times, for more goals."""
    everything = load.results()
    failed = [t for t, code in everything if code not in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED)]
    r.calls, r.wrong_allows = len(everything), load.wrong_allows()
    r.unavailable = load.count(grpc.StatusCode.UNAVAILABLE)
    r.recovery_s = load.recovery_s(killed_at, killed_at)
    engineer_denied = load.count(grpc.StatusCode.PERMISSION_DENIED, "engineer ListAccounts")
    r.detail.append(f"answers by caller: {load.summary()}")
    r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls}")
    r.goal("a load was really sent", r.calls >= 100, str(r.calls))
    r.goal("engineers never refused", engineer_denied == 0, str(engineer_denied))
    r.goal("at most ~1% of calls failed", len(failed) <= max(1, r.calls // 100),
           f"{len(failed)} of {r.calls} ({len(failed) / max(1, r.calls):.2%})")
    return failed


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
    failed = _kill_goals(r, load, killed_at)
    r.detail.append(f"{len(load.loads['engineer ListAccounts'].between(killed_at))} engineer calls after the kill; "
                    f"out of rotation after {out_after:.1f} s; last failure {r.recovery_s:.1f} s after the kill")
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


_FAST_ALLOWED = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
_POLICY_BYTES = "rpcauthz_fast_path_policy_bytes"


def fast_path_failover(workdir: pathlib.Path, pg_dsn: str, *, after_s: float = 4.0) -> ScenarioResult:
    """The fast path on (4 parts), 2 replicas: kill -9 of the replica serving Envoy's ADS
    stream, under load. Envoy reconnects to the other replica, which compiled the same parts
    (same labels, same bytes) and renews them instead of resending: no part reloaded, and
    engineers' calls stay on the fast path through the kill."""
    r = ScenarioResult("kill -9 of the fast path's ADS replica")
    with GatewayStack(workdir, store_url=pg_dsn, grants=cast_grants(), replicas=2, fast_path=True,
                      extauthz={"fast_path.shards": 4, "fast_path.ttl_s": 10,
                                "fast_path.modes_check_s": 0.2}) as gw:
        assert gw.envoy is not None
        envoy = gw.envoy
        wait_until(lambda: gw.healthy_replicas() == 2, 20, "both replicas healthy")

        def fast_allowed() -> int:
            return int(envoy.stats(_FAST_ALLOWED).get(_FAST_ALLOWED) or 0)
        callers = _callers(gw)
        with MixedLoad(gw.gateway, callers) as load:
            # The non-engineers' Checks reach both replicas: both learn the service's modes.
            wait_until(lambda: fast_allowed() > 0, 20, "engineers' calls on the fast path")
            wait_until(lambda: len({gw.replica_sample(i, _POLICY_BYTES) for i in (0, 1)}) == 1, 20,
                       "both replicas publishing the same policy")
            serving = gw.ads_replica()
            other = 1 - serving
            reloads, fast_before = gw.fast_path_reloads(), fast_allowed()
            victim = gw.replicas[serving]
            assert victim is not None
            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            reconnected = wait_until(lambda: gw.replica_sample(other, FAST_PATH_ENVOYS) == 1, 20,
                                     "Envoy's ADS stream on the other replica")
            time.sleep(after_s)
            renewed = gw.replica_sample(other, FAST_PATH_RESUMED)
            reloaded = {k: n - reloads.get(k, 0) for k, n in gw.fast_path_reloads().items()}
            # Calls answered by now, then Envoy's count (it counts a call before answering it).
            engineer_after = len(load.loads["engineer ListAccounts"].between(killed_at))
            fast_after = fast_allowed() - fast_before
    _kill_goals(r, load, killed_at)
    r.detail.append(f"ADS on the other replica {reconnected:.1f} s after the kill; parts renewed there: "
                    f"{renewed:.0f} stream(s); parts reloaded by Envoy: {sum(reloaded.values())}; "
                    f"fast-path allows after the kill: {fast_after}, engineer calls answered after it: "
                    f"{engineer_after}")
    r.goal("the other replica renewed the policy Envoy held", renewed >= 1, f"{renewed:.0f}")
    r.goal("Envoy reloaded no part", not any(reloaded.values()), str(reloaded))
    # Up to one call per engineer thread was in flight at the kill: counted by Envoy before it.
    in_flight = next(c.threads for c in callers if c.name == "engineer ListAccounts")
    r.goal("engineers stayed on the fast path", engineer_after > 0 and fast_after >= engineer_after - in_flight,
           f"{fast_after} fast-path allows after the kill, {engineer_after} engineer calls answered after it")
    return r
