"""The exact AssumeRole request shape, checked with botocore's Stubber against the STS model."""
from __future__ import annotations

from datetime import UTC, datetime

import boto3
import pytest
from botocore.stub import Stubber

from enclave_bridge.credentials.sts import StsError, StsMinter

ARN = "arn:aws:iam::123456789012:role/platform-admin"


def client():
    return boto3.client("sts", region_name="eu-west-2", aws_access_key_id="AKID", aws_secret_access_key="s")


def test_assume_role_request_shape():
    c = client()
    exp = datetime(2030, 1, 1, tzinfo=UTC)
    with Stubber(c) as stub:
        stub.add_response("assume_role", {
            "Credentials": {"AccessKeyId": "ASIAXXXXXXXXXXXXXXXX", "SecretAccessKey": "s" * 40,
                            "SessionToken": "t" * 40, "Expiration": exp},
            "SourceIdentity": "alice@example.com"},
            expected_params={
                "RoleArn": ARN, "RoleSessionName": "mpa-cr-0123456789ab-alice@example.com",
                "DurationSeconds": 900, "SourceIdentity": "alice@example.com",
                "Tags": [{"Key": "mpa:requester", "Value": "alice@example.com"},
                         {"Key": "mpa:approver", "Value": "bob@example.com carol@example.com"},
                         {"Key": "mpa:request-id", "Value": "cr-0123456789ab"}]})
        session = StsMinter(c).mint(role_arn=ARN, engineer="alice@example.com",
                                    approvers=["bob@example.com", "carol@example.com"],
                                    request_id="cr-0123456789ab", duration_seconds=900)
        stub.assert_no_pending_responses()
    assert session.expiration == exp and session.access_key_id == "ASIAXXXXXXXXXXXXXXXX"


def test_refuses_bad_source_identity_and_duration():
    m = StsMinter(client())
    # A space; a trailing newline (a "$" anchor would let it in); a letter outside ASCII.
    for engineer in ("alice smith", "alice\n", "ålice"):
        with pytest.raises(StsError, match="SourceIdentity"):
            m.mint(role_arn=ARN, engineer=engineer, approvers=["b"], request_id="r", duration_seconds=900)
    with pytest.raises(StsError, match="outside 900..3600"):
        m.mint(role_arn=ARN, engineer="alice", approvers=["b"], request_id="r", duration_seconds=600)


def test_sts_errors_are_refusals():
    c = client()
    with Stubber(c) as stub:
        stub.add_client_error("assume_role", service_error_code="AccessDenied", service_message="not allowed")
        with pytest.raises(StsError, match="AccessDenied"):
            StsMinter(c).mint(role_arn=ARN, engineer="alice", approvers=["b"], request_id="r", duration_seconds=900)
