"""Running the approvals server as a process, and reading its configuration."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest

from mpa.config import ApprovalsConfig, RequestPolicy
from policy import Mode

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_python_m_mpa_server_serves_and_stops_on_sigterm(tmp_path, port):
    env = {**os.environ, "MPA_STORE_URL": f"sqlite:///{tmp_path / 's.db'}",
           "MPA_DEV_ISSUER_KEY": str(tmp_path / "dev.pem"), "MPA_LISTEN_PORT": str(port),
           "MPA_PUBLIC_URL": f"http://127.0.0.1:{port}", "MPA_SLACK_WEBHOOK_URL": "",
           "MPA_AUDIT_JSONL": str(tmp_path / "audit.jsonl")}
    env.pop("MPA_ISSUER", None)
    proc = subprocess.Popen([sys.executable, "-m", "mpa.server"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        while not seen or "listening on" not in seen[-1]:
            seen.append(proc.stdout.readline())
            assert seen[-1], "".join(seen)
        assert f"listening on http://127.0.0.1:{port}" in seen[-1]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        token = httpx.post(f"http://127.0.0.1:{port}/api/dev/token", json={"subject": "zoe"}).json()["token"]
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json()["principal"] == "zoe" and me.json()["roles"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        output = "".join(seen) + proc.stdout.read()
        assert "DEV LOGIN IS ON" in output
        assert token not in output
    finally:
        proc.kill()
        proc.wait()


def test_config_from_env():
    cfg = ApprovalsConfig.from_env({
        "MPA_ISSUER": "https://sso.example.com", "MPA_JWKS_URL": "https://sso.example.com/jwks",
        "MPA_AUDIENCES": "rpcauthz, gateway", "MPA_MIN_REASON_LENGTH": "20",
        "MPA_PENDING_TTL_SECONDS": "600", "MPA_APPROVAL_TTL_SECONDS": "900",
        "MPA_MAX_APPROVAL_TTL_SECONDS": "3600",
        "MPA_REQUIRED_APPROVALS": "BREAK_GLASS_ONLY=2, payments.v1.Refunds=3",
        "MPA_SLACK_WEBHOOK_URL": "https://hooks.slack.example/T/B/xyzzy-token"})
    assert cfg.audiences == ("rpcauthz", "gateway")
    p = cfg.policy
    assert p.min_reason_length == 20 and p.pending_ttl == timedelta(minutes=10)
    assert p.default_approval_ttl == timedelta(minutes=15) and p.max_approval_ttl == timedelta(hours=1)
    assert p.required_approvals("payments.v1.Refunds", Mode.ENGINEERS_WITH_APPROVAL) == 3
    assert p.required_approvals("x.Y", Mode.BREAK_GLASS_ONLY) == 2
    assert p.required_approvals("x.Y", Mode.ENGINEERS_WITH_APPROVAL) == 1
    assert "xyzzy" not in repr(cfg)


@pytest.mark.parametrize("env, words", [
    ({}, "MPA_ISSUER and MPA_JWKS_URL must be set"),
    ({"MPA_MIN_REASON_LENGTH": "many"}, "MPA_MIN_REASON_LENGTH must be a number"),
    ({"MPA_MIN_REASON_LENGTH": "0"}, "a reason is required"),
    ({"MPA_REQUIRED_APPROVALS": "BREAK_GLASS_ONLY"}, "is not KEY=N"),
    ({"MPA_REQUIRED_APPROVALS": "BREAK_GLASS_ONLY=0"}, "at least 1"),
    ({"MPA_APPROVAL_TTL_SECONDS": "7200", "MPA_MAX_APPROVAL_TTL_SECONDS": "3600"}, "cannot exceed"),
])
def test_bad_config_is_refused_with_the_key_named(env, words):
    base = {"MPA_ISSUER": "https://sso.example.com", "MPA_JWKS_URL": "https://sso.example.com/j"}
    if env == {}:
        base = {}
    with pytest.raises(ValueError, match=words):
        ApprovalsConfig.from_env({**base, **env})


def test_request_policy_defaults():
    p = RequestPolicy()
    assert p.pending_ttl == timedelta(hours=1) and p.min_reason_length == 10


def test_server_without_an_issuer_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    res = subprocess.run([sys.executable, "-m", "mpa.server"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "MPA_ISSUER and MPA_JWKS_URL must be set" in res.stderr


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
