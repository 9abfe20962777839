"""Concurrent calls while reflection entries keep expiring: never an error, never a stampede.

Other ext_authz servers failed here (a TTL expiring under load, a deadline mid-pipeline):
with a 50 ms reflection TTL, 16 callers make 240 calls through Envoy; every one is
answered correctly and the services see far fewer reflection fetches than calls.
"""
from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.e2e.conftest import CONTRIB, ENGINEER, cast_grants
from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack

pytestmark = [pytest.mark.envoy]


def test_expiring_reflection_under_concurrency(tmp_path):
    with GatewayStack(tmp_path, store_url=f"sqlite:///{tmp_path / 's.db'}", grants=cast_grants(),
                      extauthz={"reflection.cache.ttl": 0.05, "reflection.cache.stale_window": 10,
                                "audit.allows": False}) as gw:
        calls = [(f"/{ACCOUNTS}/ListAccounts", ENGINEER, grpc.StatusCode.OK),
                 (f"/{LEDGER}/GetBalance", ENGINEER, grpc.StatusCode.OK),
                 (f"/{ACCOUNTS}/UpdateLimits", CONTRIB, grpc.StatusCode.OK),
                 (f"/{ACCOUNTS}/UpdateLimits", ENGINEER, grpc.StatusCode.PERMISSION_DENIED)] * 60
        tokens = {who: gw.token(who) for who in (ENGINEER, CONTRIB)}
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda c: (c, gw.call(c[0], token=tokens[c[1]])), calls))
        wrong = [(c, r.code, r.message[:200]) for c, r in results if r.code is not c[2]]
        assert not wrong, wrong[:5]
        with urllib.request.urlopen(gw.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        fetches = float(re.search(r'rpcauthz_reflection_cache_stat\{stat="fetches"\} ([0-9.]+)', text).group(1))
        assert 2 <= fetches < len(calls) / 3, fetches
        assert "rpcauthz_reflection_errors_total{" not in text
