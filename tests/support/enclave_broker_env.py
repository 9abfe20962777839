"""Helpers for the broker's tests: a stand-in STS endpoint over real HTTP, a broker config, and an
AWS profile whose credential_process is ``mpa fetch``."""
from __future__ import annotations

import pathlib
import sys
import threading
import urllib.parse
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

from enclave_bridge.broker.config import BrokerConfig

ROLE_ARN = "arn:aws:iam::123456789012:role/platform-admin"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def aws_profile_using_mpa_fetch(monkeypatch, tmp_path: pathlib.Path, broker: dict, who: str,
                                fetch_args: str, profile_lines: str = "") -> None:
    """Make ``[profile admin]`` the AWS SDK's profile, its ``credential_process`` the real
    ``mpa fetch FETCH_ARGS --format credential-process`` against ``broker`` with ``who``'s token;
    no other AWS credentials are visible to the SDK."""
    token_file = tmp_path / "token"
    token_file.write_text(broker["dev"].mint(who))
    fetch = (f"{sys.executable} -m mpa.broker_commands fetch {fetch_args} --format credential-process "
             f"--broker 127.0.0.1:{broker['runtime'].port} --broker-cert {broker['cert']} --token-file {token_file}")
    config = tmp_path / "config"
    config.write_text(f"[profile admin]\n{profile_lines}credential_process = {fetch}\n")
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("MPA_CONFIG_DIR", str(tmp_path / "mpa-config"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


class StubSts:
    """A local HTTP endpoint that answers STS AssumeRole the way AWS does (Query API, XML), and
    records every request it received (the form fields boto3 sent)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                stub.requests.append(form)
                if form.get("Action") != "AssumeRole":
                    self.send_error(400, "unsupported")
                    return
                exp = datetime.now(UTC) + timedelta(seconds=int(form["DurationSeconds"]))
                n = len(stub.requests)
                body = f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>{form.get('SourceIdentity', '')}</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/platform-admin/{form['RoleSessionName']}</Arn>
      <AssumedRoleId>AROA3XFRBF535PLBIFPI4:{form['RoleSessionName']}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE{n:05d}</AccessKeyId>
      <SecretAccessKey>secret{n}</SecretAccessKey>
      <SessionToken>token{n}</SessionToken>
      <Expiration>{exp.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</AssumeRoleResponse>""".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def client(self):
        return boto3.client("sts", region_name="eu-west-2", endpoint_url=self.url,
                            aws_access_key_id="AKIDBROKER", aws_secret_access_key="broker-secret")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def broker_config(jwks: dict, *, issuer: str, audience: str, oidc_issuer: str,
                  engineers=("alice@example.com", "bob@example.com", "carol@example.com"),
                  oncall=(), extra: dict | None = None) -> BrokerConfig:
    data = {
        "server_name": "broker.mpa.internal",
        "identity": {"issuer": issuer, "audience": audience, "jwks": jwks},
        "grants": [{"principal": e, "role": "engineer"} for e in engineers]
                  + [{"principal": e, "role": "security_oncall"} for e in oncall],
        "aws": {"region": "eu-west-2", "roles": [
            {"name": "platform-admin", "arn": ROLE_ARN},
            {"name": "break-glass", "arn": "arn:aws:iam::123456789012:role/break-glass",
             "mode": "BREAK_GLASS_ONLY", "max_duration": 1800}]},
        "kubernetes": {"issuer": oidc_issuer, "clusters": [
            {"name": "prod", "server": "https://prod.k8s.example", "audience": "prod-apiserver",
             "groups": ["platform-admin", "viewer"], "max_duration": 900}]},
    }
    data.update(extra or {})
    return BrokerConfig.from_dict(data)
