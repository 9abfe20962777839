"""broker.yaml on the shared configuration model: the documented example loads, and every
invalid field is refused naming its path (and file line)."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

from enclave_bridge.broker.config import BrokerConfig, ConfigError
from policy import Mode, Role

ROOT = pathlib.Path(__file__).resolve().parents[2]
JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "kid": "k"}]}


def documented_example() -> str:
    doc = (ROOT / "docs" / "enclave-broker.md").read_text()
    section = doc.split("## Configuration (`broker.yaml`)", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    (tmp_path / "issuer-jwks.json").write_text(json.dumps(JWKS))
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    return p


def test_the_documented_example_loads(tmp_path):
    cfg = BrokerConfig.from_file(write(tmp_path, documented_example()), env={})
    assert cfg.identity.jwks == JWKS and cfg.identity.issuer == "https://login.example.com"
    assert cfg.roles["break-glass"].mode is Mode.BREAK_GLASS_ONLY and cfg.roles["break-glass"].max_duration == 1800
    assert cfg.roles["platform-admin"].mode is Mode.ENGINEERS_WITH_APPROVAL
    assert cfg.clusters["prod"].groups == ("platform-admin", "viewer") and cfg.clusters["prod"].audience == "prod-apiserver"
    assert [g.role for g in cfg.grants] == [Role.ENGINEER, Role.SECURITY_ONCALL]
    assert cfg.oidc_issuer == "https://broker-oidc.example.com" and cfg.aws_region == "eu-west-2"


def test_the_shortest_reason_is_the_approvals_servers_unless_set(tmp_path):
    assert BrokerConfig.from_file(write(tmp_path, documented_example()), env={}).min_reason_length == 10
    assert BrokerConfig.from_file(write(tmp_path, edit(lambda d: d.update(min_reason_length=25))),
                                  env={}).min_reason_length == 25


def test_environment_overrides_the_file(tmp_path):
    cfg = BrokerConfig.from_file(write(tmp_path, documented_example()),
                                 env={"RPCAUTHZ_AWS__REGION": "us-east-1", "RPCAUTHZ_SERVER_NAME": "b.internal"})
    assert cfg.aws_region == "us-east-1" and cfg.server_name == "b.internal"


def edit(change) -> str:
    data = yaml.safe_load(documented_example())
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("change, words", [
    (lambda d: d["aws"]["roles"][0].update(name="Platform_Admin"), "aws.roles.0.name: 'Platform_Admin' must be lowercase"),
    (lambda d: d["aws"]["roles"][0].update(arn="arn:aws:iam::1:user/x"), "aws.roles.0.arn: 'arn:aws:iam::1:user/x' is not an IAM role ARN"),
    (lambda d: d["aws"]["roles"][0].update(name="platform-admin\n"), "aws.roles.0.name: 'platform-admin\\n' must be lowercase"),
    (lambda d: d["aws"]["roles"][0].update(arn="arn:aws:iam::123456789012:role/x\n"),
     "aws.roles.0.arn: 'arn:aws:iam::123456789012:role/x\\n' is not an IAM role ARN"),
    (lambda d: d["aws"]["roles"][1].update(mode="ENGINEERS_WITHOUT_APPROVAL"),
     "aws.roles.1.mode: ENGINEERS_WITHOUT_APPROVAL: brokered credentials always need approval"),
    (lambda d: d["aws"]["roles"][1].update(max_duration=7200), "aws.roles.1.max_duration"),
    (lambda d: d["kubernetes"].pop("issuer"), "kubernetes.issuer is required when clusters are configured"),
    (lambda d: d["kubernetes"]["clusters"][0].pop("groups"), "kubernetes.clusters.0.groups: required key is missing"),
    (lambda d: (d["aws"].pop("roles"), d["kubernetes"].pop("clusters")), "the broker offers nothing"),
    (lambda d: d["identity"].pop("issuer"), "identity.issuer: required key is missing"),
    (lambda d: d.pop("identity"), "identity: required key is missing"),
    (lambda d: d["grants"].append({"principal": "x@example.com", "role": "contributor"}), "grants.2"),
    (lambda d: d["grants"].append({"principal": "x@example.com", "role": "admin"}), "grants.2.role"),
    (lambda d: d.update(server_nmae="x"), "server_nmae: unknown key"),
    (lambda d: d.update(min_reason_length=0), "min_reason_length"),
])
def test_invalid_fields_are_refused_by_path(tmp_path, change, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        BrokerConfig.from_file(write(tmp_path, edit(change)), env={})


def test_errors_name_the_file_line(tmp_path):
    text = documented_example().replace("  audience: rpcauthz\n", "  audience: rpcauthz\n  audiance: x\n")
    p = write(tmp_path, text)
    line = text.splitlines().index("  audiance: x") + 1
    with pytest.raises(ConfigError, match=re.escape(f"identity.audiance: unknown key (at {p} line {line})")):
        BrokerConfig.from_file(p, env={})


def test_a_jwks_without_keys_or_an_unreadable_jwks_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="identity.jwks .* must hold at least one key"):
        BrokerConfig.from_file(write(tmp_path, edit(lambda d: d["identity"].update(jwks={"keys": []}, jwks_file=None))),
                               env={})
    with pytest.raises(ConfigError, match="identity.jwks_file: cannot read"):
        BrokerConfig.from_file(write(tmp_path, edit(lambda d: d["identity"].update(jwks_file="nope.json"))), env={})


def test_broker_serve_refuses_a_bad_config_by_key_before_anything_else(tmp_path):
    import os
    import subprocess
    import sys
    p = write(tmp_path, documented_example().replace("server_name:", "server_nmae:"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPCAUTHZ_") or k == "RPCAUTHZ_TEST_PG_DSN"}
    res = subprocess.run([sys.executable, "-m", "mpactl.app", "broker", "serve", "--config", str(p),
                          "--state", str(tmp_path / "state.db"), "--audit-log", str(tmp_path / "audit.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"server_nmae: unknown key (at {p} line" in res.stderr
    assert not (tmp_path / "state.db").exists()
