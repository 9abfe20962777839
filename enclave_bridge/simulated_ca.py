"""A stand-in for AWS's Nitro attestation PKI, for local runs and tests.

The shape follows the real chain: a self-signed P-384 root, intermediates that carry Subject and
Authority Key Identifiers, and a short-lived leaf that signs attestation documents. Like the real
leaf, ours has *no* Authority Key Identifier, so verifiers must relax that end-entity rule.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)
_LEAF_USAGE = x509.KeyUsage(  # as on the NSM's leaf: digitalSignature + nonRepudiation
    digital_signature=True, content_commitment=True, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rpcauthz simulator"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "simulated NSM"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass
class SimulatedCA:
    """Root -> ``intermediates`` CAs; :meth:`issue_leaf` makes the document-signing certificate.

    Three intermediates by default, like AWS's regional, zonal and instance CAs (path lengths 2, 1, 0).
    """

    name: str = "simulated.nitro-enclaves"
    intermediates: int = 3
    now: dt.datetime = field(default_factory=_utcnow)
    root: Issued = field(init=False)
    chain: list[Issued] = field(init=False)

    def __post_init__(self) -> None:
        if self.intermediates < 1:
            raise ValueError("the Nitro chain has at least one intermediate")
        key = ec.generate_private_key(ec.SECP384R1())
        subject = _name(self.name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(days=1))
            .not_valid_after(self.now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_CA_USAGE, critical=True)
        )
        self.root = Issued(builder.sign(key, hashes.SHA384()), key)
        self.chain = []
        issuer = self.root
        for depth in range(self.intermediates):
            issuer = self._issue_ca(issuer, f"intermediate-{depth}.{self.name}",
                                    path_length=self.intermediates - depth - 1,
                                    days=365 - 30 * depth)
            self.chain.append(issuer)

    def _issue_ca(self, issuer: Issued, common_name: str, *, path_length: int, days: int) -> Issued:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(issuer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(hours=1))
            .not_valid_after(self.now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
            .add_extension(_CA_USAGE, critical=True)
            .sign(issuer.key, hashes.SHA384())
        )
        return Issued(cert, key)

    def issue_leaf(self, common_name: str, *, not_before: dt.datetime, lifetime: dt.timedelta) -> Issued:
        """A document-signing certificate like the NSM's: P-384, digitalSignature, no AKI."""
        issuer = self.chain[-1]
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(issuer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .sign(issuer.key, hashes.SHA384())
        )
        return Issued(cert, key)

    @property
    def cabundle(self) -> list[bytes]:
        """DER certificates in the order documents carry them: ``[root, intermediates...]``."""
        return [self.root.der] + [c.der for c in self.chain]
