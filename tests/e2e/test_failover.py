"""Failover through real Envoy (envoy/gateway.yaml's health checks, outlier detection and
ext_authz retry policy) with two ext_authz replicas on one PostgreSQL (issue 9, finding 2):
a kill -9 of one replica under load costs at most ~1% of calls and the dead replica is out of
rotation within 5 s; a rolling restart (SIGTERM, restart, next) costs no call at all."""
from __future__ import annotations

import signal
import time

import grpc
import pytest

from tests.e2e.conftest import ENGINEER, cast_grants
from tests.support.call_load import CallLoad
from tests.support.gateway_harness import ACCOUNTS, GatewayStack

pytestmark = [pytest.mark.envoy, pytest.mark.postgres, pytest.mark.slow]

LIST = f"/{ACCOUNTS}/ListAccounts"


def _wait(predicate, within: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {within}s")


def test_kill_9_of_one_replica_costs_at_most_one_percent_and_leaves_rotation_within_5s(tmp_path, pg_dsn):
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=cast_grants(), replicas=2) as gw:
        _wait(lambda: gw.healthy_replicas() == 2, 20, "both replicas healthy")
        load = CallLoad(gw.gateway, LIST, gw.token(ENGINEER), threads=4).start()
        try:
            time.sleep(3)
            victim = gw.replicas[1]
            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            out_after = _wait(lambda: gw.healthy_replicas() == 1, 10, "the dead replica out of rotation")
            time.sleep(4)
        finally:
            load.stop()
        after = load.between(killed_at)
        everything = load.between(0)
        failed = [r for r in everything if r[1] is not grpc.StatusCode.OK]
        summary = CallLoad.summary(everything)
        print(f"\nkill -9: calls {len(everything)} ({len(after)} after the kill), answers {summary}, "
              f"out of rotation after {out_after:.1f}s")
        assert len(everything) >= 100, summary
        assert not any(code is grpc.StatusCode.PERMISSION_DENIED for _, code in everything)
        assert len(failed) <= max(1, len(everything) // 100), summary
        assert out_after <= 5.0
        if failed:
            assert max(t for t, _ in failed) - killed_at <= 5.0, "failures must stop within 5 s"


def test_rolling_restart_costs_no_call(tmp_path, pg_dsn):
    # The shipped drain notice (5 s) is above Envoy's 2 x 1 s health checks; shorter here only
    # to keep the test short, still above them.
    with GatewayStack(tmp_path, store_url=pg_dsn, grants=cast_grants(), replicas=2,
                      extauthz={"drain_notice_s": 3}) as gw:
        _wait(lambda: gw.healthy_replicas() == 2, 20, "both replicas healthy")
        load = CallLoad(gw.gateway, LIST, gw.token(ENGINEER), threads=4).start()
        try:
            time.sleep(2)
            for i in range(2):
                proc = gw.replicas[i]
                assert proc is not None
                assert proc.stop(timeout=20) == 0, proc.output()[-3000:]
                gw.start_replica(i)
                _wait(lambda: gw.healthy_replicas() == 2, 20, f"replica {i} back in rotation")
            time.sleep(2)
        finally:
            load.stop()
        everything = load.between(0)
        summary = CallLoad.summary(everything)
        print(f"\nrolling restart: calls {len(everything)}, answers {summary}")
        assert len(everything) >= 100, summary
        assert summary == {"OK": len(everything)}, summary
