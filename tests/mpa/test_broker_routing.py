"""Credential (broker) requests name the people who may approve them, from the broker's own
grants, on the credential page, in `mpa request aws`, `mpa show`, `mpa review` and `--json`;
when nobody can, the requester hears it at once (issue 10, routing). Real broker, pinned TLS."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.support.approvals_env import approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
A, B, C, D = "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"


@pytest.fixture
def env_and_broker(tmp_path):
    from devstack.devissuer import DevIssuer
    from enclave_bridge.broker.notify import MemoryAuditLog
    from enclave_bridge.broker.server import start_broker
    from enclave_bridge.seeds import SeedBundle
    from mpa.broker_link import BrokerLink
    from tests.support.enclave_broker_env import StubSts, broker_config
    issuer = DevIssuer(tmp_path / "dev-issuer.pem")  # the key approvals_env signs with
    sts = StubSts()
    # On the broker: four engineers; dave alone is security on-call, so nobody can approve his
    # break-glass request.
    config = broker_config(issuer.jwks(), issuer=issuer.issuer, audience=issuer.audience,
                           oidc_issuer="http://127.0.0.1:1", engineers=(A, B, C, D), oncall=(D,))
    runtime = start_broker(config, SeedBundle.generate(), state_path=tmp_path / "broker.db",
                           audit=[MemoryAuditLog()], sts_client=sts.client(),
                           cert_out=tmp_path / "broker.pem")
    link = BrokerLink.from_files(f"127.0.0.1:{runtime.port}", tmp_path / "broker.pem")
    try:
        with approvals_env(tmp_path, broker=link) as env:
            yield env, runtime.port
    finally:
        runtime.close()
        sts.close()


def test_credential_requests_name_who_can_approve_and_warn_when_nobody_can(tmp_path, env_and_broker):
    env, port = env_and_broker

    def mpa(who: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
        e.update(MPA_SERVER=env.url, MPA_TOKEN=env.issuer.mint(who), MPA_CONFIG_DIR=str(tmp_path / who),
                 MPA_BROKER=f"127.0.0.1:{port}", MPA_BROKER_CERT=str(tmp_path / "broker.pem"),
                 COLUMNS="200")
        res = subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=e, input=stdin,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    # Somebody can: the requester sees who at once, by name (not herself).
    made = mpa(A, "request", "aws", "platform-admin", "-r", "rotate the NAT keys", "--json")
    asked = json.loads(made.stdout)
    assert asked["eligible_approvers"] == [B, C, D] and asked["routing_note"] == ""
    text = mpa(A, "show", asked["id"]).stdout
    assert f"can approve now: {B}, {C}, {D}" in text and "WARNING" not in text
    page = env.call("GET", f"/credentials/{asked['id']}", A)
    assert page.status_code == 200
    assert f'id="eligible">{B}, {C}, {D}</dd>' in page.text and 'id="routing-note"' not in page.text

    # Nobody can: dave is the only security on-call. Told at once by `mpa request`, then by
    # `mpa show` (id or page link), the page and --json.
    alone = mpa(D, "request", "aws", "break-glass", "-r", "contain the key leak", "--incident", "INC-9")
    assert "can approve now: nobody" in alone.stdout
    assert ("WARNING: Nobody can approve this request now: it needs a security on-call engineer "
            "other than the requester, and nobody else holds that role.") in alone.stdout
    cr = alone.stdout.split()[0]
    link = f"{env.url}/credentials/{cr}"
    assert "WARNING: Nobody can approve" in mpa(D, "show", link).stdout
    shown = json.loads(mpa(D, "broker", "show", cr, "--json").stdout)
    assert shown["eligible_approvers"] == [] and shown["routing_note"].startswith("Nobody can approve")
    page = env.call("GET", f"/credentials/{cr}", D)
    assert 'id="eligible"><strong>nobody</strong>' in page.text
    assert 'id="routing-note">Nobody can approve this request now' in page.text

    # The credential page's forms need the session's CSRF token, as the approval page's do.
    forged = env.call("POST", f"/credentials/{asked['id']}/approve", B, data={"comment": "ok"})
    assert forged.status_code == 403 and "CSRF token is missing or wrong" in forged.text
    assert json.loads(mpa(A, "broker", "show", asked["id"], "--json").stdout)["approvals"] == []

    # A reviewer's `mpa review` names the others who could approve too; once approved, nobody is
    # listed and nothing warns.
    review = mpa(B, "review", "--broker-only", stdin="a\n\n")
    assert f"can approve now: {B}, {C}, {D}" in review.stdout and "approved: " in review.stdout
    after = mpa(A, "show", asked["id"]).stdout
    assert after.split()[1] == "approved" and "can approve now" not in after and "WARNING" not in after


def test_show_of_a_credential_id_without_a_broker_says_what_to_set(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    e.update(MPA_CONFIG_DIR=str(tmp_path), MPA_SERVER="http://127.0.0.1:9")
    res = subprocess.run([sys.executable, "-m", "mpa.cli", "show", "cr-0123456789ab"], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "set MPA_BROKER" in res.stderr, res.stderr
