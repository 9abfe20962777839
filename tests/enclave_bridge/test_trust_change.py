"""A change of the broker's trusted measurement end to end: `mpactl broker trust propose` opens an MPA
request in the real approvals service, the proposer cannot approve it, another security on-call
does, and `trust accept` verifies the service's signed receipt with the broker's own grants."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.enclave_bridge.test_measure import git, repo  # noqa: F401  (fixture: a small artifact repo)
from tests.support.approvals_env import ONCALL, approvals_env

ROOT = Path(__file__).resolve().parents[2]
PROPOSER, APPROVER = ONCALL  # both security on-call in the approvals service's grants
ENGINEER = "bob@example.com"  # an engineer, not on-call


@pytest.fixture
def env(tmp_path):
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "receipt-key.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    (tmp_path / "receipt-public.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with approvals_env(tmp_path, config={"receipt_key_path": str(key_file)}) as e:
        yield e


def broker_yaml(env, path: Path, oncall: tuple[str, ...]) -> Path:
    path.write_text(yaml.safe_dump({
        "identity": {"issuer": env.issuer.issuer, "audience": env.issuer.audience, "jwks": env.issuer.jwks()},
        "grants": [{"principal": p, "role": "engineer"} for p in (PROPOSER, APPROVER, ENGINEER)]
        + [{"principal": p, "role": "security_oncall"} for p in oncall],
        "aws": {"roles": [{"name": "platform-admin", "arn": "arn:aws:iam::123456789012:role/platform-admin"}]},
    }))
    return path


def mpactl(env, who: str, *args: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "MPA_TOKEN": env.issuer.mint(who), "MPA_SERVER": env.url,
               "MPA_CONFIG_DIR": str(env.tmp / "mpa-config")}
    return subprocess.run([sys.executable, "-m", "mpactl.app", "broker", "trust", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_one_person_cannot_change_the_trusted_measurement_two_can(env, repo):  # noqa: F811
    ledger = env.tmp / "trust.json"
    config = broker_yaml(env, env.tmp / "broker.yaml", oncall=(PROPOSER, APPROVER))
    accept = ["accept", "--commit", "HEAD", "--repo", str(repo), "--config", str(config),
              "--approvals-key", str(env.tmp / "receipt-public.pem"), "--ledger", str(ledger)]

    # An engineer who is not on-call cannot even propose (BREAK_GLASS_ONLY rules).
    r = mpactl(env, ENGINEER, "propose", "--commit", "HEAD", "--repo", str(repo), "--reason", "release 2",
               "--incident", "CHG-42")
    assert r.returncode == 1 and "security on-call" in r.stderr, r.stderr

    r = mpactl(env, PROPOSER, "propose", "--commit", "HEAD", "--repo", str(repo), "--reason", "release 2",
               "--incident", "CHG-42")
    assert r.returncode == 0, r.stderr
    rid = r.stdout.split()[0]
    request = env.call("GET", f"/api/v1/requests/{rid}", PROPOSER).json()
    assert request["service"] == "rpcauthz.enclave.v1.BrokerMeasurement" and request["mode"] == "BREAK_GLASS_ONLY"

    # Not approved yet: no receipt, nothing trusted.
    r = mpactl(env, PROPOSER, "accept", rid, *accept[1:])
    assert r.returncode == 1 and "not approved" in r.stderr
    # The proposer cannot approve their own change, nor can an engineer who is not on-call.
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", PROPOSER).status_code == 403
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", ENGINEER).status_code == 403
    assert not ledger.exists()

    # The approver builds it themselves: the request is bound to that build, not to another commit.
    r = mpactl(env, APPROVER, "check", rid, "--commit", "HEAD", "--repo", str(repo))
    assert r.returncode == 0 and f"ok: {rid} is bound to your build" in r.stdout, r.stderr
    (repo / "policy" / "rules.py").write_text("RULES = 2\n")
    git(repo, "commit", "-qam", "another build")
    r = mpactl(env, APPROVER, "check", rid, "--commit", "HEAD", "--repo", str(repo))
    assert r.returncode == 6 and "MISMATCH" in r.stderr
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", APPROVER, json={"comment": "built it: same"}
                    ).status_code == 200
    # A broker whose own grants do not make the approver on-call refuses the same receipt.
    strict = broker_yaml(env, env.tmp / "strict.yaml", oncall=(PROPOSER,))
    r = mpactl(env, PROPOSER, "accept", rid, *accept[1:6], str(strict), *accept[7:])
    assert r.returncode == 6 and "security on-call in this broker's grants" in r.stderr, r.stderr
    assert not ledger.exists()

    r = mpactl(env, PROPOSER, "accept", rid, *accept[1:])
    assert r.returncode == 0, r.stderr
    assert f"proposed by {PROPOSER}, approved by {APPROVER}" in r.stdout
    shown = json.loads(mpactl(env, PROPOSER, "show", "--ledger", str(ledger)).stdout)
    assert shown["request_id"] == rid and shown["approvers"] == [APPROVER]
    assert json.loads(mpactl(env, PROPOSER, "show", "--ledger", str(ledger), "--json").stdout) == shown
    assert "receipt" not in shown and shown["sha384"] and shown["commit"]

    # The change has its own audit trail in the approvals store.
    trail = [(e.kind, e.actor) for e in env.store.list_audit(service="rpcauthz.enclave.v1.BrokerMeasurement")
             if e.request_id == rid]
    assert trail[0][1] == PROPOSER and trail[-1][1] == APPROVER and len(trail) >= 2, trail


def test_a_receipt_from_another_approvals_key_is_refused(env, repo, tmp_path):  # noqa: F811
    config = broker_yaml(env, env.tmp / "broker.yaml", oncall=(PROPOSER, APPROVER))
    rid = mpactl(env, PROPOSER, "propose", "--commit", "HEAD", "--repo", str(repo), "--reason", "release 3",
                 "--incident", "CHG-43").stdout.split()[0]
    assert env.call("POST", f"/api/v1/requests/{rid}/approve", APPROVER).status_code == 200
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = mpactl(env, PROPOSER, "accept", rid, "--commit", "HEAD", "--repo", str(repo), "--config", str(config),
               "--approvals-key", str(other), "--ledger", str(env.tmp / "trust.json"))
    assert r.returncode == 6 and "signature is not the approvals service's" in r.stderr
