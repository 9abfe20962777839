"""CMS EnvelopedData as AWS KMS returns it in ``CiphertextForRecipient``.

When an enclave calls KMS Decrypt with ``Recipient={"AttestationDocument": ...}``, KMS does not
return the plaintext; it returns a BER-encoded CMS ``EnvelopedData`` (RFC 5652) addressed to the
RSA public key carried in the attestation document:

* exactly one ``KeyTransRecipientInfo``, identified by ``subjectKeyIdentifier`` = the SHA-256 of
  the recipient key's DER SubjectPublicKeyInfo (32 bytes; checked against a genuine KMS response);
* key transport RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 4055);
* content encrypted with AES-256-CBC.

The decryptor also accepts the two other ways a sender may name an RSA recipient: the SHA-1
key identifier ``openssl cms -keyid`` writes (RFC 5280 4.2.1.2 method 1), and issuerAndSerialNumber
(which names a certificate the enclave's ephemeral key does not have, so it cannot be compared:
the OAEP decryption of the content key is then what decides). Any other identifier is refused
as :class:`WrongRecipient` naming the identifier KMS would have written for our key.

``cryptography``'s PKCS#7 helpers cannot read this (no OAEP, no SKI recipients), so the structure
is parsed with ``asn1crypto`` and the primitives come from ``cryptography``. Anything that is not
exactly this profile is refused with a :class:`CmsError` subclass naming what was wrong: a
decryptor that "tries its best" is how downgrade attacks start.

:func:`encrypt_for_recipient` builds the same profile; the local KMS stand-in uses it, and the
tests check it against ``openssl cms -decrypt`` so the two sides are not only tested on each other.

AES-CBC has no integrity of its own: a flipped bit in the middle of the content is not detected
here. KMS-released keys are therefore used as AES-GCM keys for the actual secrets (see
``enclave_bridge.seeds``), which is where tampering with the plaintext is caught.
"""
from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core, keys
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "CmsError", "MalformedCms", "UnsupportedCms", "WrongRecipient", "DecryptionFailed",
    "decrypt_enveloped", "encrypt_for_recipient", "openssl_key_identifier", "subject_key_identifier",
]


class CmsError(ValueError):
    """The CMS message could not be decrypted. Subclasses say why."""


class MalformedCms(CmsError):
    """Not DER/BER CMS EnvelopedData at all, or a required field is missing."""


class UnsupportedCms(CmsError):
    """Well-formed CMS, but not the KMS profile (recipient type, OAEP parameters, cipher)."""


class WrongRecipient(CmsError):
    """The message is addressed to a different key than ours."""


class DecryptionFailed(CmsError):
    """The encrypted key or the content did not decrypt (wrong key or tampered bytes)."""


def _spki_der(public_key: rsa.RSAPublicKey | bytes) -> bytes:
    if isinstance(public_key, bytes):
        return public_key
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_spki(der: bytes) -> keys.PublicKeyInfo:
    try:
        spki = keys.PublicKeyInfo.load(der, strict=True)
        spki["public_key"].contents  # noqa: B018 - forces the parse
    except Exception as e:  # asn1crypto raises several types for bad input
        raise MalformedCms(f"recipient public key is not DER SubjectPublicKeyInfo: {e}") from None
    return spki


def subject_key_identifier(public_key: rsa.RSAPublicKey | bytes) -> bytes:
    """The recipient identifier AWS KMS writes: SHA-256 of the DER SubjectPublicKeyInfo (32 bytes).

    ``public_key`` is a key object or its DER SubjectPublicKeyInfo (as an attestation document's
    ``public_key`` carries it). This is the key id the enclave expects in ``CiphertextForRecipient``.
    """
    der = _spki_der(public_key)
    _load_spki(der)
    return hashlib.sha256(der).digest()


def openssl_key_identifier(public_key: rsa.RSAPublicKey | bytes) -> bytes:
    """RFC 5280 section 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING contents
    (20 bytes), what ``openssl cms -keyid`` writes from a certificate's default SKI."""
    spki = _load_spki(_spki_der(public_key))
    return hashlib.sha1(spki["public_key"].contents[1:]).digest()  # drop the unused-bits octet


def _oaep_is_sha256(params: algos.RSAESOAEPParams) -> bool:
    hash_alg = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    label = params["p_source_algorithm"]
    return (hash_alg == "sha256" and mgf["algorithm"].native == "mgf1"
            and mgf["parameters"]["algorithm"].native == "sha256"
            and label["algorithm"].native == "p_specified" and label["parameters"].native in (b"", None))


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def decrypt_enveloped(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt a KMS ``CiphertextForRecipient`` with the enclave's RSA private key.

    Raises :class:`MalformedCms`, :class:`UnsupportedCms`, :class:`WrongRecipient` or
    :class:`DecryptionFailed`; never returns partial or unauthenticated-by-profile output.
    """
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise TypeError("decrypt_enveloped needs an RSA private key")
    try:
        info = cms.ContentInfo.load(data, strict=True)
        content_type = info["content_type"].native
    except Exception as e:
        raise MalformedCms(f"not a CMS ContentInfo: {e}") from None
    if content_type != "enveloped_data":
        raise UnsupportedCms(f"CMS content type is {content_type!r}, expected enveloped_data")
    try:
        env = info["content"]
        recipients = list(env["recipient_infos"])
        eci = env["encrypted_content_info"]
        enc_alg = eci["content_encryption_algorithm"]
        alg_name = enc_alg["algorithm"].native
        ciphertext = eci["encrypted_content"].native
    except Exception as e:
        raise MalformedCms(f"malformed EnvelopedData: {e}") from None

    if len(recipients) != 1:
        raise UnsupportedCms(f"expected exactly one recipient, found {len(recipients)}")
    ri = recipients[0]
    if ri.name != "ktri":
        raise UnsupportedCms(f"recipient is {ri.name}, expected KeyTransRecipientInfo (ktri)")
    ktri = ri.chosen
    try:
        rid = ktri["rid"]
        kea = ktri["key_encryption_algorithm"]
        kea_name = kea["algorithm"].native
        encrypted_key = ktri["encrypted_key"].native
    except Exception as e:
        raise MalformedCms(f"malformed KeyTransRecipientInfo: {e}") from None
    public_key = private_key.public_key()
    if rid.name == "subject_key_identifier":
        theirs = rid.chosen.native
        ours = subject_key_identifier(public_key)
        if theirs not in (ours, openssl_key_identifier(public_key)):
            raise WrongRecipient(f"message is for key id {theirs.hex()}, ours is {ours.hex()} "
                                 "(SHA-256 of our SubjectPublicKeyInfo, as KMS writes it)")
    elif rid.name != "issuer_and_serial_number":
        raise UnsupportedCms(f"recipient identified by {rid.name}, expected subjectKeyIdentifier")
    # issuerAndSerialNumber names a certificate our ephemeral key has none of: nothing to compare,
    # so the OAEP decryption below decides (a message for another key fails there).
    if kea_name != "rsaes_oaep":
        raise UnsupportedCms(f"key transport is {kea_name}, expected rsaes_oaep")
    try:
        oaep_ok = _oaep_is_sha256(kea["parameters"])
    except Exception as e:
        raise MalformedCms(f"malformed RSAES-OAEP parameters: {e}") from None
    if not oaep_ok:
        raise UnsupportedCms("RSAES-OAEP parameters are not SHA-256 with MGF1-SHA-256 and an empty label")
    if alg_name != "aes256_cbc":
        raise UnsupportedCms(f"content cipher is {alg_name}, expected aes256_cbc")
    iv = enc_alg["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != 16:
        raise MalformedCms("AES-256-CBC parameters must be a 16-byte IV")
    if not ciphertext or len(ciphertext) % 16:
        raise MalformedCms("encrypted content is missing or not a whole number of AES blocks")

    try:
        cek = private_key.decrypt(encrypted_key, _oaep())
    except ValueError:
        raise DecryptionFailed("the encrypted content key does not decrypt with our private key") from None
    if len(cek) != 32:
        raise DecryptionFailed(f"content key is {len(cek)} bytes, AES-256 needs 32")
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionFailed("content padding is invalid: the ciphertext was altered") from None


def encrypt_for_recipient(plaintext: bytes, recipient_public_key: rsa.RSAPublicKey | bytes) -> bytes:
    """Build DER CMS EnvelopedData in the KMS profile, addressed to ``recipient_public_key``.

    ``recipient_public_key`` is an RSA key object or DER SubjectPublicKeyInfo (as carried in
    an attestation document's ``public_key`` field).
    """
    if isinstance(recipient_public_key, bytes):
        try:
            loaded = serialization.load_der_public_key(recipient_public_key)
        except ValueError as e:
            raise MalformedCms(f"recipient public key is not DER SubjectPublicKeyInfo: {e}") from None
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise UnsupportedCms("the recipient key must be RSA")
        recipient_public_key = loaded
    if not isinstance(recipient_public_key, rsa.RSAPublicKey):
        raise UnsupportedCms("the recipient key must be RSA")
    cek = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = recipient_public_key.encrypt(cek, _oaep())

    oaep_params = algos.RSAESOAEPParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
    })
    ktri = cms.KeyTransRecipientInfo({
        "version": "v2",
        "rid": cms.RecipientIdentifier(
            name="subject_key_identifier",
            value=core.OctetString(subject_key_identifier(recipient_public_key))),
        "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": oaep_params},
        "encrypted_key": encrypted_key,
    })
    env = cms.EnvelopedData({
        "version": "v2",
        "recipient_infos": [cms.RecipientInfo(name="ktri", value=ktri)],
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
            "encrypted_content": ciphertext,
        },
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump()
