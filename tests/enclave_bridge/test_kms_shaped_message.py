"""A CiphertextForRecipient shaped the way AWS KMS writes it, built here without the project's encryptor.

The AWS KMS documentation ("How AWS Nitro Enclaves uses AWS KMS", the Decrypt API's
``CiphertextForRecipient``) describes the answer as CMS EnvelopedData whose one
KeyTransRecipientInfo names the attestation document's RSA key, with RSAES-OAEP (SHA-256,
MGF1-SHA-256) key transport and AES-256-CBC content. A genuine KMS answer names the recipient by
subjectKeyIdentifier = SHA-256 of the key's DER SubjectPublicKeyInfo. The message below is written
field by field with asn1crypto, checked by ``openssl cms`` (an independent CMS implementation), and
decrypted through the broker's own path (:func:`decrypt_with_attestation`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess

import pytest
from asn1crypto import algos, core
from asn1crypto import cms as asn1cms
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclave_bridge import cms
from enclave_bridge.kms import decrypt_with_attestation
from tests.support.enclave_broker_attest import make_nsm, verifier_for


def kms_shaped_message(plaintext: bytes, spki_der: bytes) -> bytes:
    """EnvelopedData as KMS writes it for the RSA key ``spki_der`` (independent of enclave_bridge.cms)."""
    public_key = serialization.load_der_public_key(spki_der)
    assert isinstance(public_key, rsa.RSAPublicKey)
    cek, iv = os.urandom(32), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    content = enc.update(padder.update(plaintext) + padder.finalize()) + enc.finalize()
    encrypted_key = public_key.encrypt(cek, asym.OAEP(mgf=asym.MGF1(hashes.SHA256()),
                                                      algorithm=hashes.SHA256(), label=None))
    ktri = asn1cms.KeyTransRecipientInfo({
        "version": "v2",  # RFC 5652: v2 when the rid is a subjectKeyIdentifier
        "rid": asn1cms.RecipientIdentifier(
            name="subject_key_identifier", value=core.OctetString(hashlib.sha256(spki_der).digest())),
        "key_encryption_algorithm": {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams({
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }),
        },
        "encrypted_key": encrypted_key,
    })
    enveloped = asn1cms.EnvelopedData({
        "version": "v2",
        "recipient_infos": [asn1cms.RecipientInfo(name="ktri", value=ktri)],
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
            "encrypted_content": content,
        },
    })
    return asn1cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


class KmsShapedStandIn:
    """A KmsClient (the AWS endpoint is the one thing mocked) that answers like KMS: it reads the
    recipient key from the verified attestation document and writes a KMS-shaped message to it."""

    def __init__(self, nsm, plaintext: bytes) -> None:
        self._verify = verifier_for(nsm)
        self._pcrs = {0: nsm.pcrs[0]}  # the key policy pins the image
        self.plaintext = plaintext
        self.answers: list[bytes] = []

    def decrypt_for_recipient(self, ciphertext_blob, attestation_document, *, key_id=None,
                              encryption_context=None) -> bytes:
        doc = self._verify(attestation_document, self._pcrs)
        assert doc.public_key, "KMS needs the recipient's public key in the document"
        self.answers.append(kms_shaped_message(self.plaintext, doc.public_key))
        return self.answers[-1]


@pytest.fixture(scope="module")
def openssl_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("kms-shaped")
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(d / "k.pem")], check=True, capture_output=True)
    key = serialization.load_pem_private_key((d / "k.pem").read_bytes(), None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return d, key, spki


def test_the_message_is_what_kms_describes_by_asn1crypto_and_openssl(openssl_key):
    d, _, spki = openssl_key
    blob = kms_shaped_message(b"released to the enclave", spki)
    (d / "msg.der").write_bytes(blob)

    info = asn1cms.ContentInfo.load(blob)
    ri = info["content"]["recipient_infos"]
    assert len(ri) == 1 and ri[0].name == "ktri"
    rid = ri[0].chosen["rid"]
    assert rid.name == "subject_key_identifier" and len(rid.chosen.native) == 32
    assert ri[0].chosen["key_encryption_algorithm"]["algorithm"].native == "rsaes_oaep"
    assert info["content"]["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"].native \
        == "aes256_cbc"

    printed = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(d / "msg.der")],
                             check=True, capture_output=True, text=True).stdout
    assert "subjectKeyIdentifier" in printed and "rsaesOaep" in printed and "aes-256-cbc" in printed
    assert "sha256" in printed
    # openssl's own decryptor (no certificate: it tries the recipient with the key) opens it.
    out = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(d / "msg.der"),
                          "-inkey", str(d / "k.pem")], check=True, capture_output=True).stdout
    assert out == b"released to the enclave"


def test_the_project_decryptor_opens_it_and_names_the_key_as_kms_does(openssl_key):
    _, key, spki = openssl_key
    assert cms.subject_key_identifier(spki) == hashlib.sha256(spki).digest()
    assert cms.subject_key_identifier(key.public_key()) == hashlib.sha256(spki).digest()
    assert cms.decrypt_enveloped(kms_shaped_message(b"plain", spki), key) == b"plain"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(cms.WrongRecipient, match="SHA-256 of our SubjectPublicKeyInfo"):
        cms.decrypt_enveloped(kms_shaped_message(b"plain", spki), other)


def test_decrypts_through_the_brokers_own_path_and_advertises_the_key_id_kms_writes(caplog):
    nsm = make_nsm()
    kms = KmsShapedStandIn(nsm, b"broker seed key")
    with caplog.at_level(logging.INFO, logger="enclave_bridge.kms"):
        assert decrypt_with_attestation(kms, nsm, b"ciphertext blob") == b"broker seed key"
    advertised = [m for m in caplog.messages if "recipient key id" in m]
    assert len(advertised) == 1
    key_id = re.search(r"key id ([0-9a-f]{64})$", advertised[0]).group(1)
    rid = asn1cms.ContentInfo.load(kms.answers[0])["content"]["recipient_infos"][0].chosen["rid"]
    assert rid.chosen.native.hex() == key_id
