"""The whole path with real parts: `mpa` CLI -> real Envoy (SNI passthrough, no TLS termination)
-> parent forwarder -> (unix socket standing in for vsock) -> enclave forwarder -> the broker's TLS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from devstack.devissuer import DevIssuer
from devstack.processes import free_port
from enclave_bridge.broker.client import BrokerClient
from enclave_bridge.broker.notify import MemoryAuditLog
from enclave_bridge.broker.server import start_broker
from enclave_bridge.seeds import SeedBundle
from tests.support.enclave_broker_env import StubSts, broker_config
from tests.support.enclave_net_envoy import Envoy, forwarder, render_config

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("through-envoy")
    sts = StubSts()
    dev = DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience, oidc_issuer="http://127.0.0.1:1")
    runtime = start_broker(config, SeedBundle.generate(), state_path=tmp / "state.db", audit=[MemoryAuditLog()],
                           sts_client=sts.client(), cert_out=tmp / "broker.pem")
    ports = dict(admin=free_port(), passthrough=free_port(), parent_forwarder=free_port(), egress=free_port())
    vsock_stand_in = tmp / "vsock.sock"
    try:
        envoy_config = render_config(tmp / "envoy.yaml", egress_targets={}, **ports)
        with forwarder(f"unix://{vsock_stand_in}", f"tcp://127.0.0.1:{runtime.port}"), \
                forwarder(f"tcp://127.0.0.1:{ports['parent_forwarder']}", f"unix://{vsock_stand_in}"), \
                Envoy(envoy_config, ports["admin"], tmp / "envoy.log") as envoy:
            yield {"envoy": envoy, "sts": sts, "dev": dev, "cert": tmp / "broker.pem", "tmp": tmp, **ports}
    finally:
        runtime.close()
        sts.close()


def mpa(stack, who: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPA_BROKER": f"127.0.0.1:{stack['passthrough']}", "MPA_BROKER_CERT": str(stack["cert"]),
           "MPA_TOKEN": stack["dev"].mint(who), "MPA_CONFIG_DIR": str(stack["tmp"] / "mpa-config")}
    return subprocess.run([sys.executable, "-m", "mpa.broker_commands", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_full_loop_through_envoy_passthrough_and_forwarders(stack):
    r = mpa(stack, ALICE, "request", "aws", "platform-admin", "--reason", "through the gateway")
    assert r.returncode == 0, r.stderr
    rid = r.stdout.split()[0]
    assert mpa(stack, BOB, "broker", "review", rid, "--approve").returncode == 0
    r = mpa(stack, ALICE, "fetch", rid, "--format", "credential-process")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Version"] == 1
    assert stack["sts"].requests[-1]["SourceIdentity"] == ALICE
    stats = stack["envoy"].stats()
    assert stats.get("tcp.broker_passthrough.downstream_cx_total", 0) >= 3
    assert not [name for name in stats if ".ssl." in name or name.startswith("ssl.")]  # never terminated


def test_wrong_sni_is_refused_by_envoy(stack):
    def no_match() -> int:
        return sum(v for k, v in stack["envoy"].stats().items()
                   if k.startswith(f"listener.127.0.0.1_{stack['passthrough']}.") and k.endswith("no_filter_chain_match"))
    before = no_match()
    c = BrokerClient(f"127.0.0.1:{stack['passthrough']}", stack["cert"].read_bytes(), stack["dev"].mint(ALICE),
                     server_name="other.mpa.internal", timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        c.list()
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    c.close()
    assert no_match() > before  # Envoy closed it: no filter chain for that SNI
