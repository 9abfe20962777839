"""`mpactl broker serve --simulate`: seeds released by the local KMS only to the measurement whose
two-person change the broker verified itself, state kept across a restart, the TLS certificate
bound by attestation."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devstack.devissuer import DevIssuer
from devstack.processes import stop_process
from enclave_bridge import measure as m
from enclave_bridge.broker.client import BrokerClient
from enclave_bridge.trust import TRUST_METHOD, TRUST_MODE, TRUST_SERVICE, change_digest
from mpa.receipts import public_pem, sign_receipt
from policy import Approval, Grant, GrantSet, Role, Target, approve, open_request
from tests.conftest import free_port
from tests.support.enclave_broker_env import ROLE_ARN, StubSts
from tests.support.enclave_broker_slack import SlackStub, wait_for

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.com", "bob@example.com"
NOW = datetime.now(UTC)
DEV, SAM = "dev@example.com", "sam@example.com"
RECEIPT_KEY = Ed25519PrivateKey.generate()


def trust(ledger: Path, sha384: str, commit: str, *, approver: str = SAM) -> None:
    """A ledger entry as `mpactl broker trust accept` writes it: the approvals service's receipt
    for DEV's trust request approved by ``approver`` (the proposer themself when forged)."""
    grants = GrantSet([Grant(p, Role.ENGINEER) for p in (DEV, SAM)] + [Grant(p, Role.SECURITY_ONCALL) for p in (DEV, SAM)])
    r = open_request(request_id="trust-1", requester=DEV, target=Target(TRUST_SERVICE, TRUST_METHOD),
                     mode=TRUST_MODE, grants=grants, now=NOW, reason="test", incident="CHG-1",
                     body_sha256=change_digest(commit, sha384))
    r = approve(r, SAM, grants, NOW)
    if approver != SAM:
        r = dataclasses.replace(r, approvals=(Approval(approver, NOW, ""),))
    (ledger.parent / "receipt-key.pem").write_text(public_pem(RECEIPT_KEY))
    m.TrustLedger(ledger).accept({"commit": commit, "sha384": sha384, "request_id": r.id,
                                  "receipt": sign_receipt(r, RECEIPT_KEY)})


@contextlib.contextmanager
def serve(tmp: Path, config: Path, ledger: Path, port: int, env_extra: dict | None = None):
    cert = tmp / "broker.pem"
    cert.unlink(missing_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDBROKER", "AWS_SECRET_ACCESS_KEY": "x", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mpactl.app", "broker", "serve",
                             "--simulate", str(tmp / "sim"), "--ledger", str(ledger), "--repo", str(ROOT),
                             "--approvals-key", str(ledger.parent / "receipt-key.pem"),
                             "--config", str(config), "--state", str(tmp / "state.db"),
                             "--audit-log", str(tmp / "audit.jsonl"), "--port", str(port),
                             "--cert-out", str(cert)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (cert.exists() and Path(f"{cert}.att").exists()):
            if proc.poll() is not None:
                yield proc
                return
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start in 60 s")
            time.sleep(0.1)
        time.sleep(0.2)  # the .att file is written right after the cert; let it finish
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture
def setup(tmp_path):
    sts = StubSts()
    dev = DevIssuer()
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({
        "identity": {"issuer": dev.issuer, "audience": dev.audience, "jwks": dev.jwks()},
        "grants": [{"principal": ALICE, "role": "engineer"}, {"principal": BOB, "role": "engineer"},
                   {"principal": DEV, "role": "engineer"}, {"principal": SAM, "role": "engineer"},
                   {"principal": DEV, "role": "security_oncall"}, {"principal": SAM, "role": "security_oncall"}],
        "aws": {"region": "eu-west-2", "sts_endpoint_url": sts.url,
                "roles": [{"name": "platform-admin", "arn": ROLE_ARN}]},
    }))
    try:
        yield {"tmp": tmp_path, "config": config, "dev": dev, "sts": sts}
    finally:
        sts.close()


def test_trusted_build_gets_its_seeds_keeps_state_and_attests_its_certificate(setup):
    from enclave_bridge.attestation import Expectations
    from enclave_bridge.broker.tls import verify_certificate
    from enclave_bridge.nsm import default_simulated_pcrs

    image_pcrs = {i: default_simulated_pcrs()[i] for i in (0, 1, 2)}  # PCR1/PCR2: the simulated kernel, app

    tmp, dev = setup["tmp"], setup["dev"]
    running = m.measure(ROOT, "HEAD")
    ledger = tmp / "trust.json"
    trust(ledger, running.sha384, running.commit)
    port = free_port()
    slack_port = free_port()  # Slack is down (nothing listens) during the first run
    slack_env = {"MPA_BROKER_SLACK_WEBHOOK": f"http://127.0.0.1:{slack_port}{SlackStub.PATH}"}
    with serve(tmp, setup["config"], ledger, port, slack_env) as proc:
        assert proc.poll() is None, proc.stderr.read()
        cert_pem = first_cert = (tmp / "broker.pem").read_bytes()
        root = x509.load_pem_x509_certificate((tmp / "sim" / "simulated-root.pem").read_bytes())
        verify_certificate(cert_pem, Path(f"{tmp}/broker.pem.att").read_bytes(),
                           Expectations(root=root, pcrs={**image_pcrs, 0: bytes.fromhex(running.sha384)}))
        alice = BrokerClient(f"127.0.0.1:{port}", cert_pem, dev.mint(ALICE))
        bob = BrokerClient(f"127.0.0.1:{port}", cert_pem, dev.mint(BOB))
        rid = alice.request_aws("platform-admin", reason="restart test").id
        bob.review(rid, approve=True)
        alice.close(), bob.close()
    first_log = proc.stderr.read()
    assert "Slack delivery of broker:credential" in first_log  # Slack was down: retried, and said so
    assert SlackStub.PATH not in first_log and slack_env["MPA_BROKER_SLACK_WEBHOOK"] not in first_log
    assert (tmp / "state.db.slack.db").exists()  # the undelivered messages, on the host
    slack = SlackStub(port=slack_port)  # Slack is back for the second run
    try:
        with serve(tmp, setup["config"], ledger, port) as proc:  # a restart: seeds again through KMS, state kept
            assert proc.poll() is None, proc.stderr.read()
            cert_pem = (tmp / "broker.pem").read_bytes()
            alice = BrokerClient(f"127.0.0.1:{port}", cert_pem, dev.mint(ALICE))
            got = alice.fetch(rid)
            alice.close()
            # The webhook came from the sealed seeds; messages spooled while Slack was down arrive now.
            assert wait_for(lambda: len(slack.posts) >= 3, timeout=30)
            time.sleep(0.3)
    finally:
        slack.close()
    texts = [p["json"]["text"] for p in slack.posts]
    assert len(texts) == 3 and all(f"[request {rid}]" in t for t in texts)
    assert sorted(" requested " in t for t in texts) == [False, False, True]  # order may differ after an outage
    assert sum(" approved " in t for t in texts) == 1 and sum(" fetched " in t for t in texts) == 1
    assert SlackStub.PATH not in proc.stderr.read()  # the webhook URL is never logged
    assert got.aws.access_key_id.startswith("ASIA")
    assert setup["sts"].requests[-1]["SourceIdentity"] == ALICE
    assert cert_pem != first_cert  # a fresh TLS key per start, made inside the enclave


def test_a_build_nobody_approved_gets_no_seeds(setup):
    tmp = setup["tmp"]
    running = m.measure(ROOT, "HEAD")
    ledger = tmp / "trust.json"
    trust(ledger, hashlib.sha384(b"some other build").hexdigest(), running.commit)
    with serve(tmp, setup["config"], ledger, free_port()) as proc:
        proc.wait(timeout=60)
        err = proc.stderr.read()
    assert proc.returncode == 1
    assert "seed secrets were not released" in err and ("ImageSha384" in err or "PCR0" in err), err


def test_a_trust_change_only_the_proposer_approved_gets_no_seeds(setup):
    tmp = setup["tmp"]
    running = m.measure(ROOT, "HEAD")
    ledger = tmp / "trust.json"
    trust(ledger, running.sha384, running.commit, approver=DEV)  # the right build, one person
    with serve(tmp, setup["config"], ledger, free_port()) as proc:
        proc.wait(timeout=60)
        err = proc.stderr.read()
    assert proc.returncode == 1
    assert "not a verified two-person change" in err and "one person cannot change" in err, err
