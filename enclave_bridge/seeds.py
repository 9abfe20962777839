"""The broker's seed secrets, released only to a measured enclave through KMS.

A seed bundle file is envelope-encrypted: a random 256-bit data key is encrypted by KMS (under a
key whose policy pins the broker's PCRs), and the bundle itself is AES-256-GCM under that data
key. At start the enclave asks KMS for the data key *as a recipient* (attestation document +
ephemeral RSA key, see :func:`enclave_bridge.kms.decrypt_with_attestation`) and opens the bundle.
Because the bundle is GCM, a tampered data key or bundle is refused here, which covers the lack
of integrity in the CMS layer's AES-CBC.

The bundle holds:

* ``state_key``: the 32-byte key that seals the broker's state on the host (:mod:`.sealed`);
* ``kubernetes_signing_key``: the RSA private key (PEM) that signs Kubernetes OIDC tokens;
* ``aws``: optional long-lived credentials the broker uses to call STS AssumeRole;
* ``slack_webhook_url``: optional Slack incoming webhook for credential notifications.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .kms import Attester, KmsClient, decrypt_with_attestation

FORMAT = "mpa-broker-seeds/v1"
CONTEXT = {"purpose": "mpa-broker-seeds"}


class SeedError(Exception):
    """The seed bundle could not be opened; the broker must not start."""


@dataclasses.dataclass(frozen=True)
class SeedBundle:
    state_key: bytes
    kubernetes_signing_key: bytes  # PEM, PKCS#8
    aws: Mapping[str, str] | None = None
    slack_webhook_url: str | None = None

    def __repr__(self) -> str:  # never print secrets
        return (f"SeedBundle(state_key=<32 bytes>, kubernetes_signing_key=<PEM>, "
                f"aws={'<set>' if self.aws else None}, slack={'<set>' if self.slack_webhook_url else None})")

    @classmethod
    def generate(cls, aws: Mapping[str, str] | None = None, slack_webhook_url: str | None = None) -> SeedBundle:
        """Fresh seeds (an operator runs this once, on a trusted machine or in the enclave)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return cls(os.urandom(32), pem, dict(aws) if aws else None, slack_webhook_url)

    def signing_key(self) -> rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.kubernetes_signing_key, None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SeedError("kubernetes_signing_key is not an RSA private key")
        return key

    def to_json(self) -> bytes:
        return json.dumps({"state_key": base64.b64encode(self.state_key).decode(),
                           "kubernetes_signing_key": self.kubernetes_signing_key.decode(),
                           "aws": dict(self.aws) if self.aws else None,
                           "slack_webhook_url": self.slack_webhook_url}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SeedBundle:
        try:
            body = json.loads(data)
            bundle = cls(base64.b64decode(body["state_key"]), body["kubernetes_signing_key"].encode(),
                         body.get("aws"), body.get("slack_webhook_url"))
        except (ValueError, KeyError, TypeError) as e:
            raise SeedError(f"seed bundle content is malformed: {e}") from None
        if len(bundle.state_key) != 32:
            raise SeedError("seed bundle state_key must be 32 bytes")
        return bundle


def seal_bundle(bundle: SeedBundle, key_id: str, kms_encrypt: Callable[[bytes, Mapping[str, str]], bytes]) -> bytes:
    """Envelope-encrypt ``bundle``; ``kms_encrypt(plaintext, context)`` is KMS Encrypt under ``key_id``."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    sealed = AESGCM(data_key).encrypt(nonce, bundle.to_json(), _aad(key_id))
    return json.dumps({"format": FORMAT, "key_id": key_id,
                       "encrypted_data_key": base64.b64encode(kms_encrypt(data_key, CONTEXT)).decode(),
                       "nonce": base64.b64encode(nonce).decode(),
                       "ciphertext": base64.b64encode(sealed).decode()}, indent=1).encode()


def _aad(key_id: str) -> bytes:
    return f"{FORMAT}|{key_id}".encode()


def open_bundle(data: bytes, kms: KmsClient, attester: Attester) -> SeedBundle:
    """Open a sealed seed bundle inside the enclave. Any failure raises (the broker does not start)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise SeedError(f"not a seed bundle (format {doc.get('format')!r}, expected {FORMAT})")
        key_id = doc["key_id"]
        encrypted_data_key = base64.b64decode(doc["encrypted_data_key"])
        nonce = base64.b64decode(doc["nonce"])
        ciphertext = base64.b64decode(doc["ciphertext"])
    except (ValueError, KeyError, TypeError) as e:
        raise SeedError(f"seed bundle file is malformed: {e}") from None
    data_key = decrypt_with_attestation(kms, attester, encrypted_data_key, key_id=key_id,
                                        encryption_context=CONTEXT)
    if len(data_key) != 32:
        raise SeedError("KMS released a data key of the wrong size")
    try:
        plaintext = AESGCM(data_key).decrypt(nonce, ciphertext, _aad(key_id))
    except (InvalidTag, ValueError):
        raise SeedError("seed bundle does not authenticate with the released data key (tampered?)") from None
    return SeedBundle.from_json(plaintext)
