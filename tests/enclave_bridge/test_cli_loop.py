"""The full loop over real gRPC + TLS: `mpa request`, another engineer's review, `mpa fetch`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from jwcrypto import jwk
from jwcrypto import jwt as jwcrypto_jwt

from devstack.devissuer import DevIssuer
from enclave_bridge.broker.client import BrokerClient
from enclave_bridge.broker.notify import MemoryAuditLog
from enclave_bridge.broker.server import start_broker
from enclave_bridge.broker.tls import make_tls_identity
from enclave_bridge.seeds import SeedBundle
from tests.conftest import free_port
from tests.support.enclave_broker_env import ROLE_ARN, StubSts, aws_profile_using_mpa_fetch, broker_config

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker")
    sts = StubSts()
    oidc_port = free_port()
    oidc_issuer = f"http://127.0.0.1:{oidc_port}"
    dev = DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience, oidc_issuer=oidc_issuer)
    audit = MemoryAuditLog()
    runtime = start_broker(config, SeedBundle.generate(), state_path=tmp / "state.db", audit=[audit],
                           sts_client=sts.client(), oidc_listen=("127.0.0.1", oidc_port),
                           cert_out=tmp / "broker.pem")
    try:
        yield {"runtime": runtime, "sts": sts, "dev": dev, "audit": audit, "cert": tmp / "broker.pem",
               "tmp": tmp, "oidc_issuer": oidc_issuer}
    finally:
        runtime.close()
        sts.close()


def mpa(broker, who: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPA_BROKER": f"127.0.0.1:{broker['runtime'].port}", "MPA_BROKER_CERT": str(broker["cert"]),
           "MPA_TOKEN": broker["dev"].mint(who), "MPA_CONFIG_DIR": str(broker["tmp"] / "mpa-config"),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mpa.broker_commands", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def request_id_from(out: str) -> str:
    return out.split()[0]


def test_full_aws_loop_through_the_cli(broker):
    r = mpa(broker, ALICE, "request", "aws", "platform-admin", "--reason", "fix the NAT gateway", "--duration", "1800")
    assert r.returncode == 0, r.stderr
    rid = request_id_from(r.stdout)
    assert rid.startswith("cr-") and "pending" in r.stdout

    r = mpa(broker, ALICE, "broker", "review", rid, "--approve")
    assert r.returncode == 1 and "cannot approve their own request" in r.stderr

    r = mpa(broker, ALICE, "fetch", rid, "--format", "credential-process")
    assert r.returncode != 0 and "not approved" in r.stderr and r.stdout == ""

    r = mpa(broker, BOB, "broker", "list", "--reviewable")
    assert rid in r.stdout
    r = mpa(broker, BOB, "broker", "review", rid, "--approve", "-m", "looks right")
    assert r.returncode == 0, r.stderr
    assert "approved by bob@example.com: looks right" in r.stdout

    r = mpa(broker, ALICE, "fetch", "--aws", "platform-admin", "--format", "credential-process")
    assert r.returncode == 0, r.stderr
    creds = json.loads(r.stdout)
    assert set(creds) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert creds["Version"] == 1 and creds["AccessKeyId"].startswith("ASIA")
    exp = datetime.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 1700 < (exp - datetime.now(UTC)).total_seconds() <= 1800

    sent = broker["sts"].requests[-1]
    assert sent["SourceIdentity"] == ALICE and sent["RoleArn"] == ROLE_ARN and sent["DurationSeconds"] == "1800"
    assert sent["Tags.member.2.Value"] == BOB

    kinds = [(e.kind, e.actor) for e in broker["audit"] if e.request_id == rid]
    assert kinds == [("credential.requested", ALICE), ("credential.approved", BOB), ("credential.fetched", ALICE)]


def test_aws_cli_runs_mpa_fetch_as_credential_process(broker, tmp_path, monkeypatch):
    """The real AWS CLI's credential_process contract, driven by botocore's own loader."""
    import botocore.session
    r = mpa(broker, ALICE, "request", "aws", "platform-admin", "--reason", "cli test of the loop")
    rid = request_id_from(r.stdout)
    assert mpa(broker, BOB, "broker", "review", rid, "--approve").returncode == 0
    aws_profile_using_mpa_fetch(monkeypatch, tmp_path, broker, ALICE, rid)
    session = botocore.session.Session(profile="admin")
    creds = session.get_credentials().get_frozen_credentials()
    assert creds.access_key.startswith("ASIA") and creds.token.startswith("token")
    assert broker["sts"].requests[-1]["SourceIdentity"] == ALICE


def test_kubernetes_loop_prints_an_exec_credential(broker):
    r = mpa(broker, ALICE, "request", "k8s", "prod", "-g", "platform-admin", "--reason", "drain node")
    assert r.returncode == 0, r.stderr
    rid = request_id_from(r.stdout)
    assert mpa(broker, BOB, "broker", "review", rid, "--approve").returncode == 0
    r = mpa(broker, ALICE, "fetch", "--k8s", "prod", "--format", "exec-credential",
            env_extra={"KUBERNETES_EXEC_INFO": json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                                                           "kind": "ExecCredential", "spec": {"interactive": False}})})
    assert r.returncode == 0, r.stderr
    cred = json.loads(r.stdout)
    assert cred["apiVersion"] == "client.authentication.k8s.io/v1" and cred["kind"] == "ExecCredential"
    import urllib.request
    with urllib.request.urlopen(broker["oidc_issuer"] + "/openid/v1/jwks", timeout=5) as resp:
        keyset = jwk.JWKSet.from_json(resp.read().decode())
    token = jwcrypto_jwt.JWT(jwt=cred["status"]["token"], key=keyset, algs=["RS256"],
                             check_claims={"iss": broker["oidc_issuer"], "aud": "prod-apiserver", "exp": None})
    claims = json.loads(token.claims)
    assert claims["sub"] == ALICE and claims["groups"] == ["platform-admin"]
    exp = datetime.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(exp.timestamp()) == claims["exp"]


def test_fetch_without_approval_fails_like_a_plugin_should(broker):
    r = mpa(broker, "carol@example.com", "fetch", "--aws", "platform-admin", "--format", "credential-process")
    assert r.returncode == 1 and r.stdout == "" and "no approved request" in r.stderr


def test_unauthenticated_and_forged_tokens_are_refused(broker):
    port = broker["runtime"].port
    cert = broker["cert"].read_bytes()
    forged = DevIssuer().mint(ALICE)  # right claims, another key
    for token in ("", "not-a-jwt", forged):
        c = BrokerClient(f"127.0.0.1:{port}", cert, token)
        with pytest.raises(grpc.RpcError) as e:
            c.list()
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        c.close()


def test_client_pins_the_broker_certificate(broker):
    port = broker["runtime"].port
    other = make_tls_identity("broker.mpa.internal")  # same name, another key
    c = BrokerClient(f"127.0.0.1:{port}", other.cert_pem, broker["dev"].mint(ALICE), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        c.list()
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    c.close()
    c = BrokerClient(f"127.0.0.1:{port}", broker["cert"].read_bytes(), broker["dev"].mint(ALICE),
                     server_name="other.name", timeout=5)
    with pytest.raises(grpc.RpcError):
        c.list()
    c.close()


def test_cli_errors_name_what_is_missing(broker, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    r = subprocess.run([sys.executable, "-m", "mpa.broker_commands", "fetch", "cr-x"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "MPA_BROKER" in r.stderr
    r = mpa(broker, ALICE, "fetch", "cr-x", "--aws", "platform-admin")
    assert r.returncode == 2 and "exactly one" in r.stderr
    r = mpa(broker, ALICE, "fetch", "cr-doesnotexist")
    assert r.returncode == 1 and "not found" in r.stderr
    r = mpa(broker, ALICE, "broker", "list", env_extra={"MPA_TOKEN": DevIssuer().mint(ALICE)})
    assert r.returncode == 3 and "unauthenticated" in r.stderr


def test_cli_reads_the_session_mpa_login_saved(broker, tmp_path):
    (tmp_path / "session.json").write_text(json.dumps({"server": "http://x", "token": broker["dev"].mint(BOB)}))
    r = mpa(broker, ALICE, "broker", "list", env_extra={"MPA_TOKEN": "", "MPA_CONFIG_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    r = mpa(broker, ALICE, "broker", "list", env_extra={"MPA_TOKEN": "", "MPA_CONFIG_DIR": str(tmp_path / "none")})
    assert r.returncode == 3 and "mpa login" in r.stderr


def test_plugin_formats_reuse_unexpired_credentials_per_engineer(broker, tmp_path):
    cfg = {"MPA_CONFIG_DIR": str(tmp_path / "shared-config")}
    for who in (ALICE, BOB):
        r = mpa(broker, who, "request", "aws", "platform-admin", "--reason", "cache test")
        rid = request_id_from(r.stdout)
        other = BOB if who == ALICE else ALICE
        assert mpa(broker, other, "broker", "review", rid, "--approve").returncode == 0
    sts = broker["sts"].requests
    n = len(sts)
    first = mpa(broker, ALICE, "fetch", "--aws", "platform-admin", "--format", "credential-process", env_extra=cfg)
    second = mpa(broker, ALICE, "fetch", "--aws", "platform-admin", "--format", "credential-process", env_extra=cfg)
    assert first.returncode == second.returncode == 0 and first.stdout == second.stdout
    assert len(sts) == n + 1  # the AWS CLI calling again did not mint again
    cache_files = list((tmp_path / "shared-config" / "cache").iterdir())
    assert len(cache_files) == 1 and oct(cache_files[0].stat().st_mode & 0o777) == "0o600"
    bob = mpa(broker, BOB, "fetch", "--aws", "platform-admin", "--format", "credential-process", env_extra=cfg)
    assert bob.returncode == 0 and bob.stdout != first.stdout and sts[-1]["SourceIdentity"] == BOB
    fresh = mpa(broker, ALICE, "fetch", "--aws", "platform-admin", "--format", "credential-process", "--no-cache",
                env_extra=cfg)
    assert fresh.returncode == 0 and fresh.stdout != first.stdout and len(sts) == n + 3


def mpa_cli(broker, who: str, *args: str, stdin: str = "", env_extra: dict | None = None):
    """The real `mpa` entry point (mpa.cli), which the broker commands plug into."""
    env = {**os.environ, "MPA_BROKER": f"127.0.0.1:{broker['runtime'].port}", "MPA_BROKER_CERT": str(broker["cert"]),
           "MPA_TOKEN": broker["dev"].mint(who), "MPA_CONFIG_DIR": str(broker["tmp"] / f"cfg-{who}"),
           "COLUMNS": "200", **(env_extra or {})}
    env.pop("MPA_SERVER", None)
    return subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_mpa_review_walks_broker_requests_then_fetch_works(broker):
    r = mpa_cli(broker, ALICE, "request", "aws", "platform-admin", "--reason", "review walk")
    assert r.returncode == 0, r.stderr
    rid = request_id_from(r.stdout)
    assert "mpa review" in r.stdout
    r2 = mpa_cli(broker, ALICE, "request", "aws", "platform-admin", "--reason", "to be rejected")
    rid2 = request_id_from(r2.stdout)

    # Alice cannot review her own requests: `mpa review` offers her neither.
    mine = mpa_cli(broker, ALICE, "review", "--broker-only")
    assert mine.returncode == 0, mine.stderr
    assert rid not in mine.stdout and rid2 not in mine.stdout

    # Bob walks every pending request he may review, oldest first; approve ours, reject the second,
    # skip anything else earlier tests left pending.
    pending = [x.id for x in BrokerClient(f"127.0.0.1:{broker['runtime'].port}", broker["cert"].read_bytes(),
                                          broker["dev"].mint(BOB)).list(reviewable=True)][::-1]
    answers = []
    for pid in pending:
        answers += ["a", "ok by bob"] if pid == rid else ["r", "not today"] if pid == rid2 else ["s"]
    r = mpa_cli(broker, BOB, "review", stdin="\n".join(answers) + "\n")
    assert r.returncode == 0, r.stderr
    assert f"approved: {rid} is now approved" in r.stdout
    assert f"rejected: {rid2} is now rejected" in r.stdout
    assert "review walk" in r.stdout and "credential request (enclave broker)" in r.stdout
    assert f"1 of {len(pending)}" in r.stdout

    r = mpa_cli(broker, ALICE, "fetch", rid, "--format", "credential-process")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["AccessKeyId"].startswith("ASIA")
    r = mpa_cli(broker, ALICE, "fetch", rid2)
    assert r.returncode == 1 and r.stdout == ""
    kinds = [(e.kind, e.actor) for e in broker["audit"] if e.request_id == rid]
    assert kinds == [("credential.requested", ALICE), ("credential.approved", BOB), ("credential.fetched", ALICE)]
    approved = [e for e in broker["audit"] if e.request_id == rid and e.kind == "credential.approved"][0]
    assert approved.detail["comment"] == "ok by bob"

    # Nothing left for Bob; `mpa broker review` still works alongside.
    again = mpa_cli(broker, BOB, "review")
    assert again.returncode == 0 and "nothing waits for your review" in again.stdout


def test_mpa_review_flags_and_refusals(broker):
    r = mpa_cli(broker, BOB, "review", "--broker-only", "--rpc-only")
    assert r.returncode == 2 and "at most one" in r.stderr
    r = mpa_cli(broker, BOB, "review", "--broker-only", env_extra={"MPA_BROKER": ""})
    assert r.returncode == 2 and "MPA_BROKER" in r.stderr
    # --rpc-only ignores the broker and, with no approvals server known, says so.
    r = mpa_cli(broker, BOB, "review", "--rpc-only")
    assert r.returncode == 2 and "no approvals server known" in r.stderr
    # A configured broker that is down fails closed with the "unavailable" exit code.
    r = mpa_cli(broker, BOB, "review", env_extra={"MPA_BROKER": f"127.0.0.1:{free_port()}"})
    assert r.returncode == 4 and "unavailable" in r.stderr
    # A forged token is refused by the broker.
    r = mpa_cli(broker, BOB, "review", env_extra={"MPA_TOKEN": DevIssuer().mint(BOB)})
    assert r.returncode == 3


def test_broker_review_subcommand_still_works(broker):
    r = mpa_cli(broker, ALICE, "request", "aws", "platform-admin", "--reason", "old style review command")
    rid = request_id_from(r.stdout)
    r = mpa_cli(broker, BOB, "broker", "review", rid, "--approve")
    assert r.returncode == 0 and "approved by bob@example.com" in r.stdout


BROKER_REQUEST_FIELDS = {"id", "state", "requester", "target", "reason", "incident", "mode", "approvals",
                         "created_at", "expires_at", "valid_until", "duration_seconds", "closed_by",
                         "close_reason", "fetches", "eligible_approvers", "routing_note"}


def test_broker_commands_print_json(broker):
    """``--json`` on request aws|k8s, broker list|show|review: one JSON document, documented fields."""
    r = mpa(broker, ALICE, "request", "aws", "platform-admin", "--reason", "json for scripts", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert set(made) == BROKER_REQUEST_FIELDS
    assert made["state"] == "pending" and made["requester"] == ALICE and made["reason"] == "json for scripts"
    assert made["target"] == {"kind": "aws", "role": "platform-admin"} and made["approvals"] == []
    assert made["created_at"].startswith("20") and made["valid_until"] is None
    rid = made["id"]

    r = mpa(broker, ALICE, "request", "k8s", "prod", "--group", "platform-admin", "--reason", "json for k8s", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target"] == {"kind": "kubernetes", "cluster": "prod", "groups": ["platform-admin"]}

    r = mpa(broker, BOB, "broker", "list", "--reviewable", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert isinstance(listed, list) and rid in [x["id"] for x in listed]
    assert all(set(x) == BROKER_REQUEST_FIELDS for x in listed)

    r = mpa(broker, BOB, "broker", "show", rid, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == rid, r.stderr
    r = mpa(broker, BOB, "broker", "review", rid, "--json")  # no flag: shows it
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "pending", r.stderr

    r = mpa(broker, BOB, "broker", "review", rid, "--approve", "-m", "ok", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["state"] == "approved" and done["approvals"][0]["approver"] == BOB
    assert done["approvals"][0]["comment"] == "ok" and done["valid_until"] is not None

    # -o means --output everywhere, so fetch's format is -f; -o is refused as a usage error
    r = mpa(broker, ALICE, "fetch", rid, "-f", "credential-process", "--no-cache")
    assert r.returncode == 0 and json.loads(r.stdout)["Version"] == 1, r.stderr
    r = mpa(broker, ALICE, "fetch", rid, "-o", "credential-process")
    assert r.returncode == 2 and "-o" in r.stderr and r.stdout == ""

    r = mpa(broker, ALICE, "broker", "show", "cr-does-not-exist", "--json")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stdout == ""
