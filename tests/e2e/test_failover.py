"""Failover through real Envoy (envoy/gateway.yaml's health checks, outlier detection and
ext_authz retry policy) with two ext_authz replicas on one PostgreSQL (issue 9, finding 2):
a kill -9 of one replica under load costs at most ~1% of calls and the dead replica is out of
rotation within 5 s; a rolling restart (SIGTERM, restart, next) costs no call at all.
The scenarios are the fault suite's (tests/support/faults/replica_faults.py)."""
from __future__ import annotations

import pytest

from tests.support.faults.replica_faults import fast_path_failover, replica_kill9, rolling_restart

pytestmark = [pytest.mark.envoy, pytest.mark.postgres, pytest.mark.slow]


def test_kill_9_of_one_replica_costs_at_most_one_percent_and_leaves_rotation_within_5s(tmp_path, pg_dsn):
    result = replica_kill9(tmp_path, pg_dsn)
    print("\n" + result.report())
    assert not result.unmet(), result.report()


def test_rolling_restart_costs_no_call(tmp_path, pg_dsn):
    result = rolling_restart(tmp_path, pg_dsn)
    print("\n" + result.report())
    assert not result.unmet(), result.report()


def test_kill_9_of_the_fast_paths_ads_replica_keeps_envoys_policy(tmp_path, pg_dsn):
    result = fast_path_failover(tmp_path, pg_dsn)
    print("\n" + result.report())
    assert not result.unmet(), result.report()
