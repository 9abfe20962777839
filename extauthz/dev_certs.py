"""A development CA and the certificates of the Envoy-to-ext_authz mTLS link (``mpactl dev-certs``).

Production gets its certificates from its own PKI; this is for the demo, the tests and a first
try. ``make_dev_certs(directory)`` writes, all PEM:

- ``ca.crt`` / ``ca.key``: a self-signed CA (the key is only needed to issue more),
- ``extauthz.crt`` / ``extauthz.key``: the server (DNS ``SERVER_NAME``, ``localhost``, IP
  127.0.0.1 and ::1), for ``listen.tls.cert`` / ``listen.tls.key``,
- ``envoy.crt`` / ``envoy.key``: Envoy's client certificate (DNS ``CLIENT_NAME``), named in the
  server's ``listen.tls.client_names`` and in the ext_authz cluster's ``transport_socket``.

``issue_client`` makes further client certificates from the same CA (tests use one to show that
a certificate from the right CA with the wrong name is refused). Keys are ECDSA P-256 and are
written with mode 0600.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The ext_authz server's DNS name in the dev certificate (Envoy checks it, and sends it as SNI).
SERVER_NAME = "ext-authz.rpcauthz.internal"
#: Envoy's client certificate name; the server accepts only the names in listen.tls.client_names.
CLIENT_NAME = "envoy-gateway.rpcauthz.internal"


@dataclasses.dataclass(frozen=True)
class DevCerts:
    """Paths of the files ``make_dev_certs`` wrote."""

    directory: pathlib.Path

    @property
    def ca(self) -> pathlib.Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> pathlib.Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> pathlib.Path:
        return self.directory / "extauthz.crt"

    @property
    def server_key(self) -> pathlib.Path:
        return self.directory / "extauthz.key"

    @property
    def client_cert(self) -> pathlib.Path:
        return self.directory / "envoy.crt"

    @property
    def client_key(self) -> pathlib.Path:
        return self.directory / "envoy.key"

    def server_settings(self) -> dict[str, object]:
        """The ``listen.tls`` section of the server config for these files."""
        return {"cert": str(self.server_cert), "key": str(self.server_key),
                "client_ca": str(self.ca), "client_names": [CLIENT_NAME]}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: pathlib.Path) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(cert: x509.Certificate, path: pathlib.Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str,
          sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _load_ca(directory: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    certs = DevCerts(directory)
    ca_cert = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{certs.ca_key} is not an ECDSA key made by make_dev_certs")
    return ca_cert, ca_key


def make_dev_certs(directory: str | os.PathLike[str], *, days: int = 30,
                   extra_server_names: tuple[str, ...] = ()) -> DevCerts:
    """Write a fresh dev CA, server and Envoy client certificate into ``directory``."""
    if days < 1:
        raise ValueError("days must be at least 1")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    certs = DevCerts(d)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("rpcauthz dev CA (not for production)")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    _write_key(ca_key, certs.ca_key)
    _write_cert(ca_cert, certs.ca)
    server_sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (SERVER_NAME, "localhost", *extra_server_names)]
    server_sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert, key = _leaf(ca_cert, ca_key, SERVER_NAME, server_sans, ExtendedKeyUsageOID.SERVER_AUTH, days)
    _write_key(key, certs.server_key)
    _write_cert(cert, certs.server_cert)
    issue_client(d, CLIENT_NAME, "envoy", days=days)
    return certs


def issue_client(directory: str | os.PathLike[str], name: str, stem: str, *,
                 days: int = 30) -> tuple[pathlib.Path, pathlib.Path]:
    """A client certificate for DNS ``name`` from the dev CA in ``directory``: ``STEM.crt``, ``STEM.key``."""
    d = pathlib.Path(directory)
    ca_cert, ca_key = _load_ca(d)
    cert, key = _leaf(ca_cert, ca_key, name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, days)
    cert_path, key_path = d / f"{stem}.crt", d / f"{stem}.key"
    _write_key(key, key_path)
    _write_cert(cert, cert_path)
    return cert_path, key_path


__all__ = ["CLIENT_NAME", "SERVER_NAME", "DevCerts", "issue_client", "make_dev_certs"]
