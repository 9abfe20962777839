"""The broker's TLS identity, made inside the enclave at start.

The private key never leaves enclave memory. The certificate is self-signed for the broker's
server name; clients pin it (trust exactly this certificate), and in production its SHA-256 is
bound into an attestation document's ``user_data`` so a client can check that the key belongs to
a measured broker before pinning.
"""
from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclasses.dataclass(frozen=True)
class TlsIdentity:
    key_pem: bytes
    cert_pem: bytes
    cert_der: bytes

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the DER certificate: what clients pin and attestation binds."""
        return "sha256:" + hashlib.sha256(self.cert_der).hexdigest()


def make_tls_identity(server_name: str, *, days: int = 30) -> TlsIdentity:
    """A fresh P-256 key and a self-signed certificate for ``server_name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    return TlsIdentity(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER))


def certificate_binding(cert_der: bytes) -> bytes:
    """The ``user_data`` that binds a TLS certificate into an attestation document."""
    return b"mpa-broker-tls-cert-sha256:" + hashlib.sha256(cert_der).digest()


def attest_certificate(attester, tls: TlsIdentity, nonce: bytes | None = None) -> bytes:
    """An attestation document whose ``user_data`` names this certificate (see :func:`verify_certificate`)."""
    return attester.attest(certificate_binding(tls.cert_der), nonce, None)


def verify_certificate(cert_pem: bytes, document: bytes, expectations) -> None:
    """Check that ``cert_pem`` is the certificate a measured broker made, before pinning it.

    ``expectations`` is an :class:`enclave_bridge.attestation.Expectations` (root and PCRs to
    trust); its ``user_data`` is replaced by this certificate's binding. Raises the verifier's
    ``AttestationError`` subclass on any mismatch.
    """
    import dataclasses as _dc

    from .. import attestation

    cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    attestation.verify(document, _dc.replace(expectations, user_data=certificate_binding(cert_der)))
