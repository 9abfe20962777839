"""The credential broker in ``mpactl demo``: a local AWS (moto + the STS gate) and the broker on it.

Needs moto's server (``pip install '.[aws-demo]'``); without it the demo runs without this part
and says how to add it. The broker runs in the demo's process (no enclave: its seeds are made
here and carry the local ``mpa-broker`` user's key, as ``mpactl broker seal-seeds --with-aws-keys``
would seal them); it mints real STS sessions on the stand-in with the engineer as SourceIdentity.
"""
from __future__ import annotations

import importlib.util
import pathlib
import shlex
import sys
from typing import Any

ROLE = "platform-admin"
BUCKET = "demo-prod-logs"


def available() -> bool:
    """Whether moto's server (the ``aws-demo`` extra) is installed."""
    return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None


class DemoBroker:
    """The local AWS and the broker; ``stop()`` stops both."""

    def __init__(self, workdir: pathlib.Path, issuer: Any, engineers: list[str], oncall: list[str]) -> None:
        import boto3

        from devstack.aws_standin import REGION, LocalAws
        from enclave_bridge.broker.audit_chain import ChainedAuditLog, audit_key
        from enclave_bridge.broker.config import BrokerConfig
        from enclave_bridge.broker.server import start_broker
        from enclave_bridge.seeds import SeedBundle

        self.workdir = workdir
        self.aws = LocalAws(trail_file=workdir / "aws-trail.jsonl").start()
        try:
            key = self.aws.create_user("mpa-broker")
            role_arn = self.aws.create_role(ROLE)
            s3 = self.aws.client("s3")
            s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
            s3.put_object(Bucket=BUCKET, Key="nat-gateway.log", Body=b"demo flow log\n")
            config = BrokerConfig.from_dict({
                "identity": {"issuer": issuer.issuer, "audience": issuer.audience, "jwks": issuer.jwks()},
                "grants": [{"principal": p, "role": "engineer"} for p in engineers]
                + [{"principal": p, "role": "security_oncall"} for p in oncall],
                "aws": {"region": REGION, "sts_endpoint_url": self.aws.url,
                        "roles": [{"name": ROLE, "arn": role_arn}]},
            })
            sts = boto3.client("sts", region_name=REGION, endpoint_url=self.aws.url,
                               aws_access_key_id=key["access_key_id"],
                               aws_secret_access_key=key["secret_access_key"])
            self.cert = workdir / "broker.pem"
            seeds = SeedBundle.generate(aws=key)
            audit = ChainedAuditLog(workdir / "broker-audit.jsonl", audit_key(seeds.state_key))
            self.runtime = start_broker(config, seeds, state_path=workdir / "broker-state.db", audit=[audit],
                                        sts_client=sts, cert_out=self.cert)
        except BaseException:
            self.aws.stop()
            raise
        self.broker_address = f"127.0.0.1:{self.runtime.port}"
        self.aws_config = workdir / "aws-config"
        fetch = f"mpa fetch --aws {ROLE} --format credential-process"
        self.aws_config.write_text(f"[profile demo-admin]\nregion = {REGION}\ncredential_process = {fetch}\n")

    def link(self) -> Any:
        """How the approvals server reaches this broker for the web inbox and credential pages."""
        from mpa.broker_link import BrokerLink
        return BrokerLink.from_files(self.broker_address, self.cert)

    def steps(self, requester: str, approver: str, config_root: str = "/tmp/mpa-demo",
              inbox_url: str = "") -> list[tuple[str, str]]:
        """(what it shows, command) for the banner: request, approve, then AWS SDK calls.
        ``inbox_url`` is the approvals server's web inbox, where the request waits too."""
        env = f"MPA_BROKER={self.broker_address} MPA_BROKER_CERT={self.cert}"
        who_r, who_a = f"MPA_CONFIG_DIR={config_root}/{requester}", f"MPA_CONFIG_DIR={config_root}/{approver}"
        aws_env = f"{env} {who_r} AWS_CONFIG_FILE={self.aws_config} AWS_PROFILE=demo-admin"
        sdk = (f"{aws_env} {shlex.quote(sys.executable)} -c \"import boto3; u='{self.aws.url}'; "
               f"print(boto3.client('sts', endpoint_url=u).get_caller_identity()['Arn']); "
               f"print([o['Key'] for o in boto3.client('s3', endpoint_url=u)"
               f".list_objects_v2(Bucket='{BUCKET}')['Contents']])\"")
        return [
            (f"{requester} asks the broker for AWS role {ROLE} (signed in with `mpa login` as above)",
             f"{env} {who_r} mpa request aws {ROLE} --reason 'read the NAT gateway flow logs'"),
            (f"{approver} approves it (or: mpa review"
             + (f"; or signed in to the web inbox {inbox_url}, under 'Waiting for my approval')"
                if inbox_url else ")"),
             f"{env} {who_a} mpa broker review REQUEST_ID --approve"),
            (f"{requester} calls AWS with the SDK; `mpa fetch` is the profile's credential_process",
             sdk),
            ("the local AWS trail: the session's SourceIdentity is the engineer, tags name the approver",
             f"cat {self.workdir / 'aws-trail.jsonl'}"),
        ]

    def stop(self) -> None:
        try:
            self.runtime.close()
        finally:
            self.aws.stop()
