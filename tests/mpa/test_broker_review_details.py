"""`mpa review` shows a broker credential request's duration, expiry and who may approve
(issue 10, finding 6), against the real broker over pinned TLS."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tests.support.approvals_env import approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
A, B = "alice@example.com", "bob@example.com"


def test_review_shows_duration_expiry_and_who_may_approve(tmp_path):
    from enclave_bridge.broker.notify import MemoryAuditLog
    from enclave_bridge.broker.server import start_broker
    from enclave_bridge.seeds import SeedBundle
    from tests.support.enclave_broker_env import StubSts, broker_config

    with approvals_env(tmp_path) as env:
        sts = StubSts()
        config = broker_config(env.issuer.jwks(), issuer=env.issuer.issuer,
                               audience=env.issuer.audience, oidc_issuer="http://127.0.0.1:1")
        runtime = start_broker(config, SeedBundle.generate(), state_path=tmp_path / "broker.db",
                               audit=[MemoryAuditLog()], sts_client=sts.client(),
                               cert_out=tmp_path / "broker.pem")
        try:
            def mpa(who: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
                e = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
                e.update(MPA_SERVER=env.url, MPA_TOKEN=env.issuer.mint(who),
                         MPA_CONFIG_DIR=str(tmp_path / who),
                         MPA_BROKER=f"127.0.0.1:{runtime.port}",
                         MPA_BROKER_CERT=str(tmp_path / "broker.pem"))
                return subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=e,
                                      input=stdin, capture_output=True, text=True, timeout=60)

            made = mpa(A, "request", "aws", "platform-admin", "-r", "rotate the NAT keys",
                       "--duration", "1800")
            assert made.returncode == 0, made.stderr
            res = mpa(B, "review", "--broker-only", stdin="s\n")
            assert res.returncode == 0, res.stderr
            assert "credential lifetime: 1800 s" in res.stdout
            assert "expires unless approved: 20" in res.stdout
            flat = " ".join(res.stdout.split())  # the terminal may wrap long lines
            assert "who may approve: an engineer other than the requester" in flat, res.stdout
        finally:
            runtime.close()
            sts.close()
