"""Running the approvals server as a process from YAML, and reading its configuration."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest
import yaml

from mpa.config import ApprovalsConfig, ConfigError, RequestPolicy, load_approvals_config
from policy import Mode

ROOT = pathlib.Path(__file__).resolve().parents[2]
ISSUER = {"issuer": "https://sso.example.com", "jwks_url": "https://sso.example.com/jwks"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without configuration variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MPA_") and not (k.startswith("RPCAUTHZ_") and k != "RPCAUTHZ_TEST_PG_DSN")}
    return {**env, **extra}


def write(tmp_path: pathlib.Path, data: dict) -> pathlib.Path:
    p = tmp_path / "approvals.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_mpactl_approvals_serve_from_yaml_serves_and_stops_on_sigterm(tmp_path, port):
    cfg = write(tmp_path, {"store_url": "sqlite:///ignored.db",
                           "dev_login": {"issuer_key": str(tmp_path / "dev.pem")},
                           "audit_jsonl_path": str(tmp_path / "audit.jsonl")})
    store = f"sqlite:///{tmp_path / 's.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "mpactl.app", "approvals", "serve", "--config",
                             str(cfg), "--port", str(port), "--store", store], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        seen: list[str] = []
        while not seen or "listening on" not in seen[-1]:
            seen.append(proc.stdout.readline())
            assert seen[-1], "".join(seen)
        assert f"listening on http://127.0.0.1:{port}" in seen[-1]
        jwks_url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        assert f"JWKS at {jwks_url}" in "".join(seen)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        token = httpx.post(f"http://127.0.0.1:{port}/api/dev/token", json={"subject": "zoe"}).json()["token"]
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json()["principal"] == "zoe" and me.json()["roles"] == []
        import jwt
        kid = jwt.get_unverified_header(token)["kid"]
        assert [k["kid"] for k in httpx.get(jwks_url).json()["keys"]] == [kid]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        output = "".join(seen) + proc.stdout.read()
        assert "DEV LOGIN IS ON" in output
        assert token not in output
        assert (tmp_path / "s.db").exists() and not (ROOT / "ignored.db").exists()
    finally:
        proc.kill()
        proc.wait()


def test_config_from_yaml_and_variables(tmp_path):
    p = write(tmp_path, {"store_url": "sqlite:///a.db", **ISSUER, "audiences": ["rpcauthz", "gateway"],
                         "policy": {"min_reason_length": 20, "pending_ttl": 600,
                                    "default_approval_ttl": 900, "max_approval_ttl": 3600,
                                    "required_approvals_by_mode": {"BREAK_GLASS_ONLY": 2},
                                    "required_approvals_by_service": {"payments.v1.Refunds": 3}}})
    cfg = load_approvals_config(p, env={
        "RPCAUTHZ_SLACK_WEBHOOK_URL": "https://hooks.slack.example/T/B/xyzzy-token",
        "RPCAUTHZ_LISTEN__PORT": "9100", "RPCAUTHZ_STORE_URL": "postgresql://db/x"})
    assert cfg.audiences == ("rpcauthz", "gateway")
    assert cfg.listen.port == 9100 and cfg.store_url == "postgresql://db/x"
    p = cfg.policy
    assert p.min_reason_length == 20 and p.pending_ttl == timedelta(minutes=10)
    assert p.default_approval_ttl == timedelta(minutes=15) and p.max_approval_ttl == timedelta(hours=1)
    assert p.required_approvals("payments.v1.Refunds", Mode.ENGINEERS_WITH_APPROVAL) == 3
    assert p.required_approvals("x.Y", Mode.BREAK_GLASS_ONLY) == 2
    assert p.required_approvals("x.Y", Mode.ENGINEERS_WITH_APPROVAL) == 1
    assert "xyzzy" not in repr(cfg)


@pytest.mark.parametrize("data, env, words", [
    ({}, {}, "issuer and jwks_url are required"),
    (ISSUER, {"RPCAUTHZ_POLICY__MIN_REASON_LENGTH": "many"},
     "policy.min_reason_length: Input should be a valid integer"),
    ({**ISSUER, "policy": {"min_reason_length": 0}}, {}, "a reason is required"),
    ({**ISSUER, "policy": {"required_approvals_by_mode": {"SOMETIMES": 2}}}, {}, "SOMETIMES"),
    ({**ISSUER, "policy": {"required_approvals_by_mode": {"BREAK_GLASS_ONLY": 0}}}, {}, "at least 1"),
    ({**ISSUER, "policy": {"default_approval_ttl": 7200, "max_approval_ttl": 3600}}, {}, "cannot exceed"),
    ({**ISSUER, "polcy": {}}, {}, "polcy: unknown key"),
    ({**ISSUER, "dev_login": {"issuer_key": "k.pem"}}, {}, "contradicts issuer/jwks_url"),
    ({"dev_login": {"issuer_key": "k.pem"}}, {"RPCAUTHZ_ISSUER": "https://sso.example.com"},
     "contradicts issuer/jwks_url"),
    (ISSUER, {"MPA_STORE_URL": "sqlite:///x.db"},
     "MPA_STORE_URL is no longer read: set store_url in the config file or RPCAUTHZ_STORE_URL"),
    (ISSUER, {"MPA_DEV_LOGIN": "1"}, "RPCAUTHZ_DEV_LOGIN"),
    ({**ISSUER, "default_mode": "HUMANS_WHO_CAN_RPC_UNSPECIFIED"}, {}, "cannot be UNSPECIFIED"),
    ({**ISSUER, "default_mode": 0}, {}, "cannot be UNSPECIFIED"),
    ({**ISSUER, "default_mode": "SOMETIMES"}, {}, "unknown humans_who_can_rpc mode 'SOMETIMES'"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path, data, env, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_approvals_config(write(tmp_path, {"store_url": "sqlite:///a.db", **data}), env=env)


def test_reflection_section_is_the_gateways(tmp_path):
    cfg = load_approvals_config(write(tmp_path, {
        "store_url": "sqlite:///a.db", **ISSUER, "default_mode": "engineers_with_approval",
        "reflection": {"endpoints": {"default": "orders.internal:50051"},
                       "tls": {"ca_file": "/etc/ca.pem", "server_name": "orders"}}}), env={})
    assert cfg.default_mode is Mode.ENGINEERS_WITH_APPROVAL
    assert cfg.reflection.tls_for("orders.internal:50051").server_name == "orders"
    with pytest.raises(ConfigError, match="reflection: .*orders.internal:50051 is not on this machine"):
        load_approvals_config(write(tmp_path, {"store_url": "x", **ISSUER,
                                               "reflection": {"endpoints": {"default": "orders.internal:50051"}}}),
                              env={})


def test_request_policy_defaults():
    p = RequestPolicy()
    assert p.pending_ttl == timedelta(hours=1) and p.min_reason_length == 10
    assert ApprovalsConfig(store_url="x", **ISSUER).public_url == "auto"


@pytest.mark.parametrize("env, words", [
    ({}, "issuer and jwks_url are required"),
    ({"MPA_ISSUER": "https://sso.example.com"}, "MPA_ISSUER is no longer read: set issuer"),
])
def test_server_with_a_bad_config_refuses_to_start(tmp_path, env, words):
    res = subprocess.run([sys.executable, "-m", "mpactl.app", "approvals", "serve", "--store",
                          f"sqlite:///{tmp_path / 's.db'}"], cwd=ROOT, env=clean_env(**env),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr
    assert not (tmp_path / "s.db").exists()


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    from devstack.demo_approvals import start_demo_approvals
    from devstack.devissuer import DevIssuer

    issuer = DevIssuer()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{busy}"):
            start_demo_approvals(f"sqlite:///{tmp_path / 's.db'}", issuer,
                                 "http://127.0.0.1:9/jwks.json", port=busy)


@pytest.mark.parametrize("configured, session", [(None, "5s"), (0, "0")], ids=["default", "off"])
def test_the_approvals_servers_store_statements_are_bounded_as_configured(pg_dsn, configured, session):
    from mpa.server import start_approvals_server
    from tests.support.pg_session import statement_timeout_of

    extra = {} if configured is None else {"store_statement_timeout_s": configured}
    with start_approvals_server(ApprovalsConfig(store_url=pg_dsn, **ISSUER, **extra)) as server:
        assert statement_timeout_of(server.store) == session
