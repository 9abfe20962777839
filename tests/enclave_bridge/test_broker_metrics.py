"""The broker's Prometheus ``/metrics`` (issue 10, finding 6): off by default; with
``metrics_listen`` set, a scrape after a request / self-approval refusal / approval / fetch loop
over real gRPC + TLS shows those counts, the requests by kind and state, and the chained audit
log's head."""
from __future__ import annotations

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.devissuer import DevIssuer
from enclave_bridge.broker.audit_chain import ChainedAuditLog, audit_key
from enclave_bridge.broker.client import BrokerClient
from enclave_bridge.broker.config import ConfigError
from enclave_bridge.broker.server import start_broker
from enclave_bridge.seeds import SeedBundle
from tests.conftest import free_port
from tests.support.enclave_broker_env import StubSts, broker_config

ALICE, BOB = "alice@example.com", "bob@example.com"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _start(tmp_path, dev, sts, *, extra: dict | None):
    oidc_issuer = f"http://127.0.0.1:{free_port()}"
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience,
                           oidc_issuer=oidc_issuer, extra=extra)
    seeds = SeedBundle.generate()
    audit = ChainedAuditLog(tmp_path / "audit.jsonl", audit_key(seeds.state_key))
    return start_broker(config, seeds, state_path=tmp_path / "state.db", audit=[audit],
                        sts_client=sts.client(), cert_out=tmp_path / "broker.pem")


def test_metrics_after_a_request_approve_fetch_loop(tmp_path):
    dev, sts = DevIssuer(), StubSts()
    runtime = _start(tmp_path, dev, sts, extra={"metrics_listen": "127.0.0.1:0"})
    try:
        assert runtime.metrics_port
        url = f"http://127.0.0.1:{runtime.metrics_port}/metrics"
        cert = (tmp_path / "broker.pem").read_bytes()
        target = f"127.0.0.1:{runtime.port}"
        alice = BrokerClient(target, cert, dev.mint(ALICE))
        bob = BrokerClient(target, cert, dev.mint(BOB))
        try:
            first = alice.request_aws("platform-admin", reason="fix the NAT gateway")
            alice.request_aws("platform-admin", reason="a second one, left pending")
            with pytest.raises(grpc.RpcError) as own:
                alice.review(first.id, approve=True)
            assert own.value.code() is grpc.StatusCode.PERMISSION_DENIED
            bob.review(first.id, approve=True)
            alice.fetch(first.id)
            with pytest.raises(grpc.RpcError):
                bob.fetch(first.id)  # only the requester fetches
        finally:
            alice.close()
            bob.close()
        got = httpx.get(url, timeout=10)
        assert got.status_code == 200
        m = _samples(got.text)
        assert m[("broker_requests_opened_total", (("kind", "aws"),))] == 2
        assert m[("broker_reviews_total", (("kind", "aws"), ("verdict", "approve")))] == 1
        assert m[("broker_approvals_total", (("kind", "aws"),))] == 1
        assert m[("broker_fetches_total", (("kind", "aws"),))] == 1
        assert m[("broker_refusals_total", (("operation", "Review"), ("reason", "SelfApproval")))] == 1
        assert m[("broker_refusals_total", (("operation", "Fetch"), ("reason", "NotEligible")))] == 1
        assert m[("broker_credential_requests", (("kind", "aws"), ("state", "approved")))] == 1
        assert m[("broker_credential_requests", (("kind", "aws"), ("state", "pending")))] == 1
        assert m[("broker_credential_requests", (("kind", "kubernetes"), ("state", "pending")))] == 0
        # requested x2, approved, fetched: four chained records.
        assert m[("broker_audit_chain_head_seq", ())] == 4
        assert "alice" not in got.text and first.id not in got.text
    finally:
        runtime.close()
        sts.close()


def test_metrics_are_off_by_default(tmp_path):
    dev, sts = DevIssuer(), StubSts()
    runtime = _start(tmp_path, dev, sts, extra=None)
    try:
        assert runtime.metrics is None and runtime.metrics_port is None
    finally:
        runtime.close()
        sts.close()


@pytest.mark.parametrize("bad", ["9464", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9464"])
def test_a_bad_metrics_listen_is_refused_by_name(bad):
    dev = DevIssuer()
    with pytest.raises(ConfigError, match="metrics_listen"):
        broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience,
                      oidc_issuer="http://127.0.0.1:1", extra={"metrics_listen": bad})


def test_mpactl_broker_serve_serves_metrics_from_its_configuration(tmp_path):
    """The real `mpactl broker serve` (simulated enclave): `metrics_listen` given through the
    settings' environment override is served, and counts a request."""
    import yaml

    from enclave_bridge import measure as m
    from tests.enclave_bridge.test_serve_simulated import DEV, ROOT, SAM, serve, trust
    from tests.support.enclave_broker_env import ROLE_ARN

    dev, sts = DevIssuer(), StubSts()
    try:
        config = tmp_path / "broker.yaml"
        config.write_text(yaml.safe_dump({
            "identity": {"issuer": dev.issuer, "audience": dev.audience, "jwks": dev.jwks()},
            "grants": [{"principal": p, "role": "engineer"} for p in (ALICE, BOB, DEV, SAM)]
            + [{"principal": p, "role": "security_oncall"} for p in (DEV, SAM)],
            "aws": {"region": "eu-west-2", "sts_endpoint_url": sts.url,
                    "roles": [{"name": "platform-admin", "arn": ROLE_ARN}]},
        }))
        running = m.measure(ROOT, "HEAD")
        ledger = tmp_path / "trust.json"
        trust(ledger, running.sha384, running.commit)
        port, metrics_port = free_port(), free_port()
        env = {"RPCAUTHZ_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
        with serve(tmp_path, config, ledger, port, env) as proc:
            assert proc.poll() is None, proc.stderr.read()
            alice = BrokerClient(f"127.0.0.1:{port}", (tmp_path / "broker.pem").read_bytes(),
                                 dev.mint(ALICE))
            try:
                alice.request_aws("platform-admin", reason="metrics through the real server")
            finally:
                alice.close()
            m_ = _samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
            assert m_[("broker_requests_opened_total", (("kind", "aws"),))] == 1
            assert m_[("broker_credential_requests", (("kind", "aws"), ("state", "pending")))] == 1
            assert m_[("broker_audit_chain_head_seq", ())] >= 1
    finally:
        sts.close()
