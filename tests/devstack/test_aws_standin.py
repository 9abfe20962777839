"""The local AWS stand-in (moto's server + the STS gate) and the whole credential loop against it:
`mpa request aws` -> another engineer approves -> `mpa fetch` as botocore's credential_process ->
real boto3 calls with the broker-minted credentials."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError

from devstack.aws_standin import LocalAws
from devstack.devissuer import DevIssuer
from enclave_bridge.broker.notify import MemoryAuditLog
from enclave_bridge.broker.server import start_broker
from enclave_bridge.seeds import SeedBundle
from tests.conftest import free_port
from tests.support.enclave_broker_env import aws_profile_using_mpa_fetch, broker_config

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    trail = tmp_path_factory.mktemp("aws") / "trail.jsonl"
    with LocalAws(trail_file=trail) as local:
        broker_key = local.create_user("mpa-broker")
        role_arn = local.create_role("platform-admin")
        local.client("s3").create_bucket(Bucket="prod-logs",
                                         CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
        local.client("s3").put_object(Bucket="prod-logs", Key="nat-gateway.log", Body=b"flows")
        yield {"local": local, "broker_key": broker_key, "role_arn": role_arn, "trail": trail}


def sts_for(aws, key) -> object:
    return aws["local"].client("sts", key["access_key_id"], key["secret_access_key"])


def test_the_stand_in_refuses_unknown_keys_and_assume_role_without_source_identity(aws):
    with pytest.raises(ClientError, match="InvalidClientTokenId"):
        aws["local"].client("sts", "AKIDNOBODY", "x").get_caller_identity()
    sts = sts_for(aws, aws["broker_key"])
    with pytest.raises(ClientError, match="sts:SourceIdentity"):
        sts.assume_role(RoleArn=aws["role_arn"], RoleSessionName="s1")
    with pytest.raises(ClientError, match="AccessDenied"):
        sts.assume_role(RoleArn="arn:aws:iam::123456789012:role/nope", RoleSessionName="s1", SourceIdentity="x1")
    got = sts.assume_role(RoleArn=aws["role_arn"], RoleSessionName="s1", SourceIdentity="carol",
                          Tags=[{"Key": "mpa:approver", "Value": "dave"}])
    assert got["SourceIdentity"] == "carol"
    c = got["Credentials"]
    session = aws["local"].client("sts", c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
    assert ":assumed-role/platform-admin/s1" in session.get_caller_identity()["Arn"]
    with pytest.raises(ClientError, match="InvalidClientTokenId"):  # the key without its session token
        aws["local"].client("sts", c["AccessKeyId"], c["SecretAccessKey"]).get_caller_identity()
    with pytest.raises(ClientError, match="AccessDenied"):  # a session cannot mint more sessions
        session.assume_role(RoleArn=aws["role_arn"], RoleSessionName="s2", SourceIdentity="carol")


@pytest.fixture(scope="module")
def broker(aws, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker")
    dev = DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience,
                           oidc_issuer=f"http://127.0.0.1:{free_port()}")
    sts = boto3.client("sts", region_name="eu-west-2", endpoint_url=aws["local"].url,
                       aws_access_key_id=aws["broker_key"]["access_key_id"],
                       aws_secret_access_key=aws["broker_key"]["secret_access_key"])
    runtime = start_broker(config, SeedBundle.generate(aws=aws["broker_key"]), state_path=tmp / "state.db",
                           audit=[MemoryAuditLog()], sts_client=sts, cert_out=tmp / "broker.pem")
    try:
        yield {"runtime": runtime, "dev": dev, "cert": tmp / "broker.pem", "tmp": tmp}
    finally:
        runtime.close()


def mpa(broker, who: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPA_BROKER": f"127.0.0.1:{broker['runtime'].port}", "MPA_BROKER_CERT": str(broker["cert"]),
           "MPA_TOKEN": broker["dev"].mint(who), "MPA_CONFIG_DIR": str(broker["tmp"] / f"mpa-{who}")}
    return subprocess.run([sys.executable, "-m", "mpa.broker_commands", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_approved_engineer_makes_real_sdk_calls_with_broker_minted_credentials(aws, broker, tmp_path, monkeypatch):
    r = mpa(broker, ALICE, "request", "aws", "platform-admin", "--reason", "read the NAT gateway logs")
    assert r.returncode == 0, r.stderr
    rid = r.stdout.split()[0]
    r = mpa(broker, BOB, "broker", "review", rid, "--approve", "-m", "ok")
    assert r.returncode == 0, r.stderr

    aws_profile_using_mpa_fetch(monkeypatch, tmp_path, broker, ALICE, "--aws platform-admin",
                                profile_lines="region = eu-west-2\n")

    session = boto3.Session(botocore_session=botocore.session.Session(profile="admin"))
    identity = session.client("sts", endpoint_url=aws["local"].url).get_caller_identity()
    assert ":assumed-role/platform-admin/" in identity["Arn"] and ALICE.split("@")[0] in identity["Arn"]
    objects = session.client("s3", endpoint_url=aws["local"].url).list_objects_v2(Bucket="prod-logs")
    assert [o["Key"] for o in objects["Contents"]] == ["nat-gateway.log"]

    trail = [json.loads(line) for line in aws["trail"].read_text().splitlines()]
    minted = [e for e in trail if e["event"] == "AssumeRole" and e["source_identity"] == ALICE]
    assert len(minted) == 1 and minted[0]["caller"] == "mpa-broker" and minted[0]["role_arn"] == aws["role_arn"]
    assert minted[0]["tags"] == {"mpa:requester": ALICE, "mpa:approver": BOB, "mpa:request-id": rid}
    calls = [(e["service"], e["source_identity"]) for e in trail
             if e["event"] == "call" and e["access_key_id"] == minted[0]["access_key_id"]]
    assert ("sts", ALICE) in calls and ("s3", ALICE) in calls


def test_without_approval_there_are_no_credentials_and_the_sdk_call_fails(aws, broker, tmp_path):
    r = mpa(broker, ALICE, "request", "aws", "platform-admin", "--reason", "not approved yet")
    rid = r.stdout.split()[0]
    r = mpa(broker, ALICE, "fetch", rid, "--format", "credential-process")
    assert r.returncode != 0 and r.stdout == "" and "not approved" in r.stderr


def test_the_stand_in_prints_no_access_line_per_call(aws, caplog):
    """moto's server logged every AWS call on the demo's terminal, above its instructions."""
    with caplog.at_level("INFO", logger="werkzeug"):
        aws["local"].client("s3").list_objects_v2(Bucket="prod-logs")
        with pytest.raises(ClientError):
            aws["local"].client("sts", "AKIDNOBODY", "x").get_caller_identity()
    assert not [r for r in caplog.records if "HTTP/1.1" in r.getMessage()], caplog.text
