"""A rendered config, started in the real Envoy: routes per the catalog, and fails closed.

No ext_authz server listens here on purpose: every authorized route must then answer
UNAVAILABLE (never reach the upstream), while routes the catalog exempts still work.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from devstack.devissuer import DevIssuer
from tests.conftest import free_port
from tests.support.owners_envoy import AccountsUpstream, EnvoyProcess
from tests.support.owners_support import run_mpactl

pytestmark = pytest.mark.envoy


@pytest.fixture
def gateway(tmp_path: Path):
    issuer = DevIssuer()
    jwks = issuer.serve()
    try:
        with AccountsUpstream() as up:
            listen, admin, dead = free_port(), free_port(), free_port()
            cat = tmp_path / "services.yaml"
            cat.write_text(f"""\
gateway:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  ext_authz:
    address: 127.0.0.1:{dead}
    timeout: 300ms
    health_check: false
  jwt:
    issuer: {issuer.issuer}
    audiences: [{issuer.audience}]
    jwks_uri: {jwks.url}
  access_log: {tmp_path / 'access.log'}
services:
  - name: rpcauthz.demo.v1.Accounts
    upstream: 127.0.0.1:{up.port}
    routes:
      - method: Ping
        ext_authz: false
        jwt: false
  - name: grpc.health.v1.Health
    upstream: 127.0.0.1:{up.port}
    ext_authz: false
    jwt: false
  - prefix: rpcauthz.shadow.
    upstream: 127.0.0.1:{up.port}
    dry_run: true
""")
            out = tmp_path / "gateway.yaml"
            res = run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out), "--validate")
            assert res.returncode == 0, res.stderr
            with EnvoyProcess(out, admin, tmp_path / "envoy.log") as envoy:
                yield envoy, f"127.0.0.1:{listen}", issuer, tmp_path
    finally:
        jwks.close()


def _call(target: str, method: str, token: str | None = None):
    from rpcauthz.demo.v1 import accounts_pb2, accounts_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        stub = accounts_pb2_grpc.AccountsStub(ch)
        md = [("authorization", f"Bearer {token}")] if token else None
        return getattr(stub, method)(accounts_pb2.AccountRequest(account_id="a1"), metadata=md, timeout=10)


def test_exempt_routes_pass_authorized_routes_fail_closed(gateway):
    envoy, target, issuer, tmp = gateway
    assert _call(target, "Ping").message == "Ping ok"          # ext_authz: false, jwt: false
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    with pytest.raises(grpc.RpcError) as e:                    # no token: jwt_authn refuses
        _call(target, "ListAccounts")
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:                    # token, ext_authz down: 503
        _call(target, "ListAccounts", issuer.mint("alice@example.com"))
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(target) as ch:                  # not in the catalog: still checked
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/other.v1.Unknown/Do")(b"", timeout=10,
                                                   metadata=[("authorization", f"Bearer {issuer.mint('alice@example.com')}")])
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    bad = DevIssuer().mint("mallory@example.com")               # signed by another key
    with pytest.raises(grpc.RpcError) as e:
        _call(target, "ListAccounts", bad)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    envoy.stop()  # flushes the access log
    import json
    lines = [json.loads(ln) for ln in (tmp / "access.log").read_text().splitlines()]
    failed = [ln for ln in lines if ln["path"] == "/rpcauthz.demo.v1.Accounts/ListAccounts"
              and ln["details"] == "ext_authz_error"]
    assert len(failed) == 1 and failed[0]["grpc_status"] == 14  # UNAVAILABLE, from status_on_error 503
    assert failed[0]["jwt_sub"] == "alice@example.com" and failed[0]["upstream_host"] is None
    assert failed[0]["route_service"] == "rpcauthz.demo.v1.Accounts" and failed[0]["dry_run"] is False
    ping = [ln for ln in lines if ln["path"] == "/rpcauthz.demo.v1.Accounts/Ping"]
    assert ping and ping[0]["http_status"] == 200 and ping[0]["grpc_status"] == 0


def test_running_gateway_reports_dry_run_services(gateway):
    envoy, *_ = gateway
    res = run_mpactl("envoy", "dry-run", "--admin", envoy.admin)
    assert res.returncode == 5, res.stdout + res.stderr
    assert "rpcauthz.shadow." in res.stdout and "rpcauthz.demo.v1.Accounts" not in res.stdout
