"""Through the real Envoy binary: TLS passes through to the broker untouched, by SNI only.

Path under test (vsock replaced by a unix socket, which is the same forwarder code):
  pinned TLS client -> Envoy broker_passthrough (tls_inspector + tcp_proxy)
    -> mpactl forward tcp->unix (parent side) -> mpactl forward unix->tcp (enclave side) -> TLS server
"""
from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess

import pytest

from devstack.processes import free_port
from tests.support.enclave_net_envoy import (
    CONFIG,
    Envoy,
    TlsEchoServer,
    forwarder,
    pinned_client_context,
    render_config,
    self_signed,
    tls_exchange,
)

pytestmark = pytest.mark.envoy

BROKER = "broker.mpa.internal"
KMS = "kms.eu-west-1.amazonaws.com"


def test_shipped_config_passes_envoy_validate():
    done = subprocess.run(["envoy", "--mode", "validate", "-c", str(CONFIG), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("passthrough")
    broker_cert, broker_key, broker_der = self_signed(BROKER, tmp)
    kms_cert, kms_key, _ = self_signed(KMS, tmp)
    ports = dict(admin=free_port(), passthrough=free_port(), parent_forwarder=free_port(), egress=free_port())
    vsock_stand_in = tmp / "vsock-8443.sock"
    egress_vsock_stand_in = tmp / "vsock-10443.sock"
    enclave_egress_port = free_port()
    with TlsEchoServer("broker", broker_cert, broker_key) as broker, \
            TlsEchoServer("kms", kms_cert, kms_key) as kms_stub:
        config = render_config(tmp / "envoy.yaml", egress_targets={"egress_aws_kms": kms_stub.port}, **ports)
        with forwarder(f"unix://{vsock_stand_in}", f"tcp://127.0.0.1:{broker.port}"), \
                forwarder(f"tcp://127.0.0.1:{ports['parent_forwarder']}", f"unix://{vsock_stand_in}"), \
                forwarder(f"unix://{egress_vsock_stand_in}", f"tcp://127.0.0.1:{ports['egress']}"), \
                forwarder(f"tcp://127.0.0.1:{enclave_egress_port}", f"unix://{egress_vsock_stand_in}"), \
                Envoy(config, ports["admin"], tmp / "envoy.log") as envoy:
            yield dict(envoy=envoy, broker=broker, kms=kms_stub, broker_cert=broker_cert, broker_der=broker_der,
                       kms_cert=kms_cert, enclave_egress=enclave_egress_port, **ports)


def test_pinned_client_completes_tls_with_the_broker_through_envoy_and_forwarders(stack):
    context = pinned_client_context(stack["broker_cert"])
    reply, peer_der = tls_exchange(stack["passthrough"], BROKER, context, b"hello broker")
    assert reply == b"broker:hello broker\n"
    # The certificate the client saw is the broker's own, byte for byte: nobody in between
    # terminated TLS and re-signed.
    assert hashlib.sha256(peer_der).digest() == hashlib.sha256(stack["broker_der"]).digest()


def test_large_exchange_passes_through_intact(stack):
    context = pinned_client_context(stack["broker_cert"])
    line = hashlib.sha512(b"seed").hexdigest().encode() * 4000  # ~512 KB in one line
    reply, _ = tls_exchange(stack["passthrough"], BROKER, context, line)
    assert reply == b"broker:" + line + b"\n"


@pytest.mark.parametrize("server_name", ["evil.example.com", "broker.mpa.internal.evil.example.com", None])
def test_wrong_or_missing_sni_is_refused_before_reaching_the_broker(stack, server_name):
    before = stack["broker"].accepted
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # even a client that would accept anything gets nowhere
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_exchange(stack["passthrough"], server_name, context, b"let me in")
    assert stack["broker"].accepted == before


def test_plaintext_is_refused(stack):
    before = stack["broker"].accepted
    with socket.create_connection(("127.0.0.1", stack["passthrough"]), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: broker.mpa.internal\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    assert stack["broker"].accepted == before


def test_a_client_pinning_another_certificate_refuses_the_broker(stack, tmp_path):
    other_cert, _, _ = self_signed(BROKER, tmp_path)  # same name, different key
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(stack["passthrough"], BROKER, pinned_client_context(other_cert), b"x")


def test_egress_passes_allowed_sni_through_and_refuses_others(stack):
    reply, _ = tls_exchange(stack["egress"], KMS, pinned_client_context(stack["kms_cert"]), b"Decrypt")
    assert reply == b"kms:Decrypt\n"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    before = stack["kms"].accepted
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_exchange(stack["egress"], "attacker.example.com", context, b"exfiltrate")
    assert stack["kms"].accepted == before


def test_enclave_egress_reaches_kms_through_both_forwarders_and_envoy(stack):
    """The broker's outbound path: enclave forwarder -> (vsock) -> parent forwarder -> Envoy egress -> KMS."""
    context = pinned_client_context(stack["kms_cert"])
    reply, _ = tls_exchange(stack["enclave_egress"], KMS, context, b"Decrypt via the enclave path")
    assert reply == b"kms:Decrypt via the enclave path\n"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_exchange(stack["enclave_egress"], "exfil.example.com", ssl._create_unverified_context(), b"x")


def test_envoy_stats_show_passthrough_without_tls_termination(stack):
    context = pinned_client_context(stack["broker_cert"])
    before = stack["envoy"].stats()
    tls_exchange(stack["passthrough"], BROKER, context, b"count me")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_exchange(stack["passthrough"], "wrong.example.com", ssl._create_unverified_context(), b"x")
    after = stack["envoy"].stats()

    # Envoy has no TLS context anywhere on this path: no handshake or ssl counters exist at all.
    assert not [name for name in after if ".ssl." in name or name.startswith("ssl.")]
    listener = f"listener.127.0.0.1_{stack['passthrough']}"
    assert not [name for name in after if name.startswith(listener) and "ssl" in name]
    # ... but the ClientHello was inspected for SNI and the bytes went through tcp_proxy.
    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)
    assert delta("tcp.broker_passthrough.downstream_cx_total") == 1
    assert delta("cluster.broker_parent_forwarder.upstream_cx_total") == 1
    assert delta("cluster.broker_parent_forwarder.upstream_cx_tx_bytes_total") > len(b"count me\n")
    assert delta("tls_inspector.sni_found") == 2
    assert delta(f"{listener}.no_filter_chain_match") == 1
