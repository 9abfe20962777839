"""Helpers for the enclave-net Envoy tests: render envoy/broker-passthrough.yaml onto free ports,
run the real Envoy binary and `mpactl forward`, run a pinned TLS echo server, read Envoy's stats."""
from __future__ import annotations

import contextlib
import datetime as dt
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack.processes import stop_process

REPO = Path(__file__).parents[2]
CONFIG = REPO / "envoy" / "broker-passthrough.yaml"


def render_config(out: Path, *, admin: int, passthrough: int, parent_forwarder: int, egress: int,
                  egress_targets: dict[str, int]) -> Path:
    """The shipped config with every address moved to 127.0.0.1 free ports; egress clusters point
    at local stubs (cluster name -> port) instead of the real AWS/Slack hosts."""
    config = yaml.safe_load(CONFIG.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin)
    listeners = {lst["name"]: lst for lst in config["static_resources"]["listeners"]}
    listeners["broker_passthrough"]["address"]["socket_address"].update(address="127.0.0.1", port_value=passthrough)
    listeners["enclave_egress"]["address"]["socket_address"].update(address="127.0.0.1", port_value=egress)
    for cluster in config["static_resources"]["clusters"]:
        sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        if cluster["name"] == "broker_parent_forwarder":
            sock["port_value"] = parent_forwarder
        elif cluster["name"] in egress_targets:
            cluster["type"] = "STATIC"
            cluster.pop("dns_lookup_family", None)
            sock.update(address="127.0.0.1", port_value=egress_targets[cluster["name"]])
        else:  # egress clusters the test does not use: point at a closed port, never the internet
            cluster["type"] = "STATIC"
            cluster.pop("dns_lookup_family", None)
            sock.update(address="127.0.0.1", port_value=1)
    out.write_text(yaml.safe_dump(config))
    return out


@contextlib.contextmanager
def forwarder(listen: str, to: str) -> Iterator[subprocess.Popen]:
    """Run `mpactl forward --listen LISTEN --to TO` until the block ends (SIGTERM, then kill)."""
    proc = subprocess.Popen([sys.executable, "-m", "mpactl.app", "forward", "--listen", listen, "--to", to,
                             "--shutdown-grace", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("forwarding"), banner + proc.stderr.read()
        yield proc
    finally:
        stop_process(proc)


class Envoy:
    """The real envoy binary on a rendered config; stopped on exit."""

    def __init__(self, config: Path, admin_port: int, log: Path):
        self.config, self.admin_port, self.log = config, admin_port, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Envoy:
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            ["envoy", "-c", str(self.config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "warn"], stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if self.admin("/ready").strip() == "LIVE":
                    return self
            time.sleep(0.1)
        raise RuntimeError("envoy did not become ready in 60 s")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        stop_process(self.proc)
        self._log_file.close()

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


def self_signed(common_name: str, directory: Path) -> tuple[Path, Path, bytes]:
    """A self-signed P-256 certificate for ``common_name``: (cert.pem, key.pem, cert DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


class TlsEchoServer:
    """A TLS server on 127.0.0.1 that answers each line with ``<name>:<line>``; counts handshakes."""

    def __init__(self, name: str, cert: Path, key: Path):
        self.name = name
        self.handshakes = 0
        self.accepted = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner.accepted += 1
                self.request.settimeout(10)
                try:
                    with context.wrap_socket(self.request, server_side=True) as tls:
                        owner.handshakes += 1
                        buffer = b""
                        while True:
                            data = tls.recv(65536)
                            if not data:
                                return
                            buffer += data
                            while b"\n" in buffer:
                                line, buffer = buffer.split(b"\n", 1)
                                tls.sendall(owner.name.encode() + b":" + line + b"\n")
                except (ssl.SSLError, OSError):
                    return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsEchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def pinned_client_context(cert: Path) -> ssl.SSLContext:
    """A client that trusts exactly this one certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(cert))
    return context


def tls_exchange(port: int, server_name: str | None, context: ssl.SSLContext, line: bytes) -> tuple[bytes, bytes]:
    """Connect to 127.0.0.1:port with this SNI, send one line; return (reply, peer certificate DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(line + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply, tls.getpeercert(binary_form=True)
