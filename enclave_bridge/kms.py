"""KMS Decrypt for a Nitro enclave recipient: the real boto3 adapter and a local stand-in.

The enclave never receives a KMS plaintext in the clear. It sends its attestation document
(which carries an ephemeral RSA public key and the enclave's PCR measurements) with the
Decrypt call; KMS checks the key policy's ``kms:RecipientAttestation:*`` conditions against
the document's PCRs and answers with ``CiphertextForRecipient``: CMS EnvelopedData that only
the enclave's private key opens (see :mod:`enclave_bridge.cms`).

* :class:`KmsClient` is the interface the broker uses.
* :class:`Boto3KmsClient` is the production adapter (boto3 ``kms.decrypt``).
* :class:`LocalKms` is the stand-in for the demo and tests: it holds keys with key policies,
  verifies attestation documents with the same verifier the rest of the system uses, and
  answers with real CMS to the document's public key. It refuses a PCR mismatch, a missing
  recipient, and a forged document.
* :func:`decrypt_with_attestation` is what runs inside the enclave: make a key pair, get a
  document binding its public key, call KMS, open the CMS.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import cms

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
IMAGE_SHA384 = "kms:RecipientAttestation:ImageSha384"
PCR_PREFIX = "kms:RecipientAttestation:PCR"

log = logging.getLogger(__name__)


class KmsError(Exception):
    """KMS refused or failed. Never treated as success."""


class KmsAccessDenied(KmsError):
    """The key policy does not allow this caller/document (KMS AccessDeniedException)."""


class KmsNotFound(KmsError):
    """No such key, or the ciphertext was not made by a key this KMS holds."""


class KmsInvalidCiphertext(KmsError):
    """The ciphertext blob or its encryption context does not authenticate."""


class KmsMissingRecipient(KmsError):
    """A key whose policy requires an attested recipient was asked for plaintext without one."""


class KmsClient(Protocol):
    """What the enclave needs from KMS."""

    def decrypt_for_recipient(self, ciphertext_blob: bytes, attestation_document: bytes, *,
                              key_id: str | None = None,
                              encryption_context: Mapping[str, str] | None = None) -> bytes:
        """Return ``CiphertextForRecipient``: CMS EnvelopedData for the document's public key."""


# --- production adapter ----------------------------------------------------------------------

class Boto3KmsClient:
    """:class:`KmsClient` over a boto3 ``kms`` client (which the caller configures: region,
    endpoint through the enclave's egress proxy, credentials)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def decrypt_for_recipient(self, ciphertext_blob: bytes, attestation_document: bytes, *,
                              key_id: str | None = None,
                              encryption_context: Mapping[str, str] | None = None) -> bytes:
        params: dict[str, Any] = {
            "CiphertextBlob": ciphertext_blob,
            "Recipient": {"KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
                          "AttestationDocument": attestation_document},
        }
        if key_id:
            params["KeyId"] = key_id
        if encryption_context:
            params["EncryptionContext"] = dict(encryption_context)
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            response = self._client.decrypt(**params)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            message = e.response.get("Error", {}).get("Message", str(e))
            raise _ERRORS.get(code, KmsError)(f"KMS Decrypt failed ({code}): {message}") from None
        except BotoCoreError as e:
            raise KmsError(f"KMS Decrypt could not be called: {e}") from None
        if response.get("Plaintext"):
            # With a Recipient KMS must not return plaintext; if it does, something between us
            # and KMS is not what we think it is. Refuse rather than use it.
            raise KmsError("KMS returned Plaintext for a recipient request; refusing it")
        blob = response.get("CiphertextForRecipient")
        if not blob:
            raise KmsError("KMS response has no CiphertextForRecipient")
        return blob


def boto3_encrypter(client: Any, key_id: str) -> Callable[[bytes, Mapping[str, str]], bytes]:
    """``encrypt(plaintext, context)`` over boto3 ``kms.encrypt`` under ``key_id`` (operators seal
    seed bundles with it; Encrypt needs no attestation, only the key policy's Encrypt grant)."""
    from botocore.exceptions import BotoCoreError, ClientError

    def encrypt(plaintext: bytes, context: Mapping[str, str]) -> bytes:
        try:
            return client.encrypt(KeyId=key_id, Plaintext=plaintext,
                                  EncryptionContext=dict(context))["CiphertextBlob"]
        except ClientError as e:
            err = e.response.get("Error", {})
            raise _ERRORS.get(err.get("Code", ""), KmsError)(
                f"KMS Encrypt failed ({err.get('Code')}): {err.get('Message')}") from None
        except BotoCoreError as e:
            raise KmsError(f"KMS Encrypt could not be called: {e}") from None
    return encrypt


_ERRORS: dict[str, type[KmsError]] = {
    "AccessDeniedException": KmsAccessDenied,
    "NotFoundException": KmsNotFound,
    "InvalidCiphertextException": KmsInvalidCiphertext,
    "IncorrectKeyException": KmsInvalidCiphertext,
}


# --- inside the enclave -------------------------------------------------------------------------

class Attester(Protocol):
    """The Nitro Security Module (real device or simulator)."""

    def attest(self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None) -> bytes: ...


def decrypt_with_attestation(kms: KmsClient, attester: Attester, ciphertext_blob: bytes, *,
                             key_id: str | None = None,
                             encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Decrypt ``ciphertext_blob`` inside the enclave.

    A fresh RSA-2048 key pair is made for this call; its public half goes into the attestation
    document, so only this process can open KMS's answer. The private key never leaves memory.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    # The key id KMS will write into the answer's RecipientInfo (SHA-256 of the SPKI), logged so
    # an operator can match a CiphertextForRecipient to the enclave call it answers.
    log.info("KMS Decrypt for recipient key id %s", cms.subject_key_identifier(spki).hex())
    document = attester.attest(None, secrets.token_bytes(32), spki)
    envelope = kms.decrypt_for_recipient(ciphertext_blob, document, key_id=key_id,
                                         encryption_context=encryption_context)
    return cms.decrypt_enveloped(envelope, key)


# --- local stand-in -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttestedDocument:
    """What the local KMS needs from a verified attestation document."""

    pcrs: Mapping[int, bytes]
    public_key: bytes | None


#: ``verify(document, pcrs)``: check the document's signature and chain (and that it shows these
#: PCRs) and return its contents; raise on a forgery or mismatch.
DocumentVerifier = Callable[[bytes, Mapping[int, bytes]], AttestedDocument]


def attestation_verifier(root: Any, *, replay_cache: Any = None) -> DocumentVerifier:
    """A :data:`DocumentVerifier` over :func:`enclave_bridge.attestation.verify` pinned to ``root``
    (the AWS Nitro root in production, the simulator's root in the demo)."""
    from . import attestation

    def verify(document: bytes, pcrs: Mapping[int, bytes]) -> AttestedDocument:
        # KMS checks exactly the key policy's conditions (which may name any PCRs), so this is the
        # one verifier that does not demand the whole image be pinned.
        att = attestation.verify(document, attestation.Expectations(
            root=root, pcrs=dict(pcrs), replay_cache=replay_cache, require_image_pcrs=False))
        return AttestedDocument(pcrs=dict(att.pcrs), public_key=att.public_key)

    return verify


@dataclasses.dataclass(frozen=True)
class KeyPolicy:
    """The attestation conditions of a key policy, as ``StringEqualsIgnoreCase`` would hold them.

    ``conditions`` maps condition keys (``kms:RecipientAttestation:ImageSha384`` or
    ``kms:RecipientAttestation:PCR<n>``) to lowercase hex. ``require_recipient`` mirrors a
    policy that only allows Decrypt with an attested recipient (the way seed keys are set up).
    """

    conditions: Mapping[str, str]
    require_recipient: bool = True

    def __post_init__(self) -> None:
        for name, value in self.conditions.items():
            if name != IMAGE_SHA384 and not (name.startswith(PCR_PREFIX) and name[len(PCR_PREFIX):].isdigit()):
                raise ValueError(f"unsupported key policy condition {name!r}")
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"condition {name} must be hex, got {value!r}") from None
            if len(raw) != 48:
                raise ValueError(f"condition {name} must be a SHA-384 (48 bytes), got {len(raw)}")
            if raw == bytes(48):
                raise ValueError(f"condition {name} is all zeros (a debug-mode enclave); refusing it")
        if self.require_recipient and not self.conditions:
            raise ValueError("a key that requires an attested recipient needs at least one PCR condition")

    @classmethod
    def for_pcrs(cls, pcrs: Mapping[int, bytes]) -> KeyPolicy:
        """Conditions pinning ``pcrs`` (PCR0 as ImageSha384, the rest by number)."""
        conditions = {}
        for index, value in sorted(pcrs.items()):
            name = IMAGE_SHA384 if index == 0 else f"{PCR_PREFIX}{index}"
            conditions[name] = value.hex()
        return cls(conditions)

    @classmethod
    def from_aws_json(cls, policy: str | Mapping[str, Any]) -> KeyPolicy:
        """Read the attestation conditions from an AWS key policy document.

        Takes the ``StringEqualsIgnoreCase`` conditions on ``kms:RecipientAttestation:*`` of
        the statements that Allow ``kms:Decrypt``. Refuses a policy with none.
        """
        doc = json.loads(policy) if isinstance(policy, str) else policy
        conditions: dict[str, str] = {}
        for st in doc.get("Statement", []):
            actions = st.get("Action", [])
            actions = [actions] if isinstance(actions, str) else actions
            if st.get("Effect") != "Allow" or not ({"kms:Decrypt", "kms:*"} & set(actions)):
                continue
            for op, entries in st.get("Condition", {}).items():
                for name, value in entries.items():
                    if name.startswith("kms:RecipientAttestation:"):
                        if op != "StringEqualsIgnoreCase":
                            raise ValueError(f"condition operator {op} on {name} is not supported")
                        conditions[name] = value.lower()
        if not conditions:
            raise ValueError("the key policy has no kms:RecipientAttestation conditions on kms:Decrypt")
        return cls(conditions)

    def pcrs(self) -> dict[int, bytes]:
        """The pinned PCRs by index (ImageSha384 is PCR0)."""
        return {0 if name == IMAGE_SHA384 else int(name[len(PCR_PREFIX):]): bytes.fromhex(value)
                for name, value in self.conditions.items()}

    def check(self, doc: AttestedDocument) -> None:
        """Raise :class:`KmsAccessDenied` unless every condition matches the document."""
        for name, want in sorted(self.conditions.items()):
            index = 0 if name == IMAGE_SHA384 else int(name[len(PCR_PREFIX):])
            got = doc.pcrs.get(index)
            if got is None:
                raise KmsAccessDenied(f"attestation document has no PCR{index}, required by {name}")
            if got.hex() != want.lower():
                raise KmsAccessDenied(f"{name} does not match: document has {got.hex()[:16]}..., "
                                      f"key policy wants {want[:16]}...")


_BLOB_MAGIC = b"LKMS1"


class LocalKms:
    """An in-process KMS stand-in with real key policies and real CMS answers.

    Ciphertext blobs are ``magic | len(key_id) | key_id | nonce | AES-GCM(plaintext)`` with the
    key id and the canonical encryption context as associated data, so a blob cannot be moved
    to another key or context. Keys are 256-bit AES keys held in memory.
    """

    def __init__(self, verifier: DocumentVerifier) -> None:
        self._verify = verifier
        self._keys: dict[str, tuple[bytes, KeyPolicy]] = {}

    def create_key(self, policy: KeyPolicy, key_id: str | None = None) -> str:
        key_id = key_id or f"local-{secrets.token_hex(8)}"
        self._keys[key_id] = (AESGCM.generate_key(bit_length=256), policy)
        return key_id

    def export_keys(self) -> dict[str, Any]:
        """Key material and policies as JSON-ready data (the demo persists its stand-in KMS)."""
        return {kid: {"material": material.hex(), "conditions": dict(policy.conditions),
                      "require_recipient": policy.require_recipient}
                for kid, (material, policy) in self._keys.items()}

    def import_keys(self, data: Mapping[str, Any]) -> None:
        for kid, entry in data.items():
            self._keys[kid] = (bytes.fromhex(entry["material"]),
                               KeyPolicy(entry["conditions"], entry.get("require_recipient", True)))

    def put_key_policy(self, key_id: str, policy: KeyPolicy) -> None:
        material, _ = self._key(key_id)
        self._keys[key_id] = (material, policy)

    def _key(self, key_id: str) -> tuple[bytes, KeyPolicy]:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KmsNotFound(f"no key {key_id!r}") from None

    @staticmethod
    def _aad(key_id: str, context: Mapping[str, str] | None) -> bytes:
        return key_id.encode() + b"\0" + json.dumps(dict(context or {}), sort_keys=True).encode()

    def encrypt(self, key_id: str, plaintext: bytes, encryption_context: Mapping[str, str] | None = None) -> bytes:
        """Like KMS Encrypt (an operator provisions seed secrets with it; no attestation needed)."""
        material, _ = self._key(key_id)
        nonce = os.urandom(12)
        sealed = AESGCM(material).encrypt(nonce, plaintext, self._aad(key_id, encryption_context))
        kid = key_id.encode()
        return _BLOB_MAGIC + struct.pack(">H", len(kid)) + kid + nonce + sealed

    def _open(self, blob: bytes, key_id: str | None, context: Mapping[str, str] | None) -> tuple[str, bytes, KeyPolicy]:
        if not blob.startswith(_BLOB_MAGIC) or len(blob) < len(_BLOB_MAGIC) + 2:
            raise KmsInvalidCiphertext("ciphertext blob was not made by this KMS")
        (n,) = struct.unpack(">H", blob[len(_BLOB_MAGIC):len(_BLOB_MAGIC) + 2])
        start = len(_BLOB_MAGIC) + 2
        blob_key = blob[start:start + n].decode(errors="replace")
        if key_id and key_id != blob_key:
            raise KmsInvalidCiphertext(f"ciphertext was made by key {blob_key!r}, not {key_id!r}")
        material, policy = self._key(blob_key)
        nonce, sealed = blob[start + n:start + n + 12], blob[start + n + 12:]
        try:
            plaintext = AESGCM(material).decrypt(nonce, sealed, self._aad(blob_key, context))
        except (InvalidTag, ValueError):
            raise KmsInvalidCiphertext("ciphertext or encryption context does not authenticate") from None
        return blob_key, plaintext, policy

    def decrypt_for_recipient(self, ciphertext_blob: bytes, attestation_document: bytes, *,
                              key_id: str | None = None,
                              encryption_context: Mapping[str, str] | None = None) -> bytes:
        if not attestation_document:
            raise KmsMissingRecipient("a recipient attestation document is required")
        _, plaintext, policy = self._open(ciphertext_blob, key_id, encryption_context)
        if not policy.conditions:
            raise KmsAccessDenied("this key's policy pins no PCRs, so it releases nothing to an enclave")
        try:
            doc = self._verify(attestation_document, policy.pcrs())
        except Exception as e:  # any verifier refusal is an access denial, never a pass
            raise KmsAccessDenied(f"attestation document refused: {type(e).__name__}: {e}") from None
        if not doc.public_key:
            raise KmsMissingRecipient("attestation document carries no public key to encrypt to")
        policy.check(doc)  # the verifier checked the PCRs too; this is the key policy's own word
        return cms.encrypt_for_recipient(plaintext, doc.public_key)

    def decrypt(self, ciphertext_blob: bytes, *, key_id: str | None = None,
                encryption_context: Mapping[str, str] | None = None) -> bytes:
        """Plain Decrypt without a recipient: refused for keys whose policy requires one."""
        _, plaintext, policy = self._open(ciphertext_blob, key_id, encryption_context)
        if policy.require_recipient:
            raise KmsMissingRecipient("this key's policy only allows Decrypt with an attested recipient")
        return plaintext
