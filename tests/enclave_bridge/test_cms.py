"""CMS EnvelopedData in the KMS CiphertextForRecipient profile, checked against the openssl CLI."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from enclave_bridge.cms import (
    DecryptionFailed,
    MalformedCms,
    UnsupportedCms,
    WrongRecipient,
    decrypt_enveloped,
    encrypt_for_recipient,
)

KMS_PROFILE = ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
               "-keyopt", "rsa_mgf1_md:sha256", "-aes-256-cbc", "-keyid"]


@pytest.fixture(scope="module")
def recipient(tmp_path_factory):
    d = tmp_path_factory.mktemp("cms")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "k.pem",
                    "-out", d / "c.pem", "-subj", "/CN=enclave", "-days", "1"],
                   check=True, capture_output=True)
    key = load_pem_private_key((d / "k.pem").read_bytes(), None)
    return d, key


def openssl_encrypt(d: Path, plaintext: bytes, flags: list[str], *, stream: bool = False) -> bytes:
    args = ["openssl", "cms", "-encrypt", "-binary", "-recip", str(d / "c.pem"), *flags, "-outform", "DER"]
    if stream:
        args.append("-stream")
    return subprocess.run(args, input=plaintext, check=True, capture_output=True).stdout


@pytest.mark.parametrize("stream", [False, True], ids=["der", "ber-indefinite"])
def test_decrypts_what_openssl_encrypts_in_the_kms_profile(recipient, stream):
    d, key = recipient
    secret = bytes(range(256)) * 3 + b"tail"
    blob = openssl_encrypt(d, secret, KMS_PROFILE, stream=stream)
    assert decrypt_enveloped(blob, key) == secret


def test_openssl_decrypts_what_we_encrypt(recipient):
    d, key = recipient
    blob = encrypt_for_recipient(b"seed secret \x00\x01", key.public_key())
    (d / "ours.der").write_bytes(blob)
    # No -recip: our key id is KMS's SHA-256 form, not the certificate's SHA-1 SKI, so openssl
    # tries the recipient with the key (as for a genuine KMS answer).
    out = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(d / "ours.der"),
                          "-inkey", str(d / "k.pem")],
                         check=True, capture_output=True).stdout
    assert out == b"seed secret \x00\x01"
    assert decrypt_enveloped(blob, key) == b"seed secret \x00\x01"


def test_refuses_a_message_for_another_key(recipient):
    d, _ = recipient
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(WrongRecipient, match="key id"):
        decrypt_enveloped(openssl_encrypt(d, b"x", KMS_PROFILE), other)


def test_refuses_pkcs1v15_key_transport(recipient):
    d, key = recipient
    blob = openssl_encrypt(d, b"x", ["-aes-256-cbc", "-keyid"])
    with pytest.raises(UnsupportedCms, match="rsaes_pkcs1v15"):
        decrypt_enveloped(blob, key)


def test_refuses_oaep_with_sha1(recipient):
    d, key = recipient
    blob = openssl_encrypt(d, b"x", ["-keyopt", "rsa_padding_mode:oaep", "-aes-256-cbc", "-keyid"])
    with pytest.raises(UnsupportedCms, match="SHA-256"):
        decrypt_enveloped(blob, key)


def test_refuses_another_content_cipher(recipient):
    d, key = recipient
    flags = [f if f != "-aes-256-cbc" else "-aes-128-cbc" for f in KMS_PROFILE]
    with pytest.raises(UnsupportedCms, match="aes128_cbc"):
        decrypt_enveloped(openssl_encrypt(d, b"x", flags), key)


def test_accepts_issuer_and_serial_recipient_and_the_key_decides(recipient):
    d, key = recipient
    flags = [f for f in KMS_PROFILE if f != "-keyid"]
    blob = openssl_encrypt(d, b"by certificate", flags)
    assert cms.ContentInfo.load(blob)["content"]["recipient_infos"][0].chosen["rid"].name == \
        "issuer_and_serial_number"
    assert decrypt_enveloped(blob, key) == b"by certificate"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(DecryptionFailed, match="does not decrypt with our private key"):
        decrypt_enveloped(blob, other)


def _modify(blob: bytes, change) -> bytes:
    info = cms.ContentInfo.load(blob)
    change(info["content"])
    return info.dump(force=True)


def test_refuses_a_tampered_encrypted_key(recipient):
    d, key = recipient

    def flip_key(env):
        ktri = env["recipient_infos"][0].chosen
        ek = bytearray(ktri["encrypted_key"].native)
        ek[10] ^= 0x40
        ktri["encrypted_key"] = bytes(ek)

    blob = _modify(openssl_encrypt(d, b"x", KMS_PROFILE), flip_key)
    with pytest.raises(DecryptionFailed, match="content key"):
        decrypt_enveloped(blob, key)


def test_refuses_tampered_content(recipient):
    d, key = recipient

    def flip_content(env):
        eci = env["encrypted_content_info"]
        ct = bytearray(eci["encrypted_content"].native)
        # 20 bytes of plaintext -> 2 blocks, 12 padding bytes of 0x0c. Flipping the last byte of the
        # first ciphertext block turns the last padding byte into 0x0d: never valid padding.
        ct[15] ^= 0x01
        eci["encrypted_content"] = bytes(ct)

    blob = _modify(openssl_encrypt(d, b"a" * 20, KMS_PROFILE), flip_content)
    with pytest.raises(DecryptionFailed, match="padding"):
        decrypt_enveloped(blob, key)


@pytest.mark.parametrize("blob", [b"", b"\x30\x03\x02\x01", b"not der at all", b"\x30\x80" + b"\x00" * 3])
def test_refuses_malformed_der(recipient, blob):
    _, key = recipient
    with pytest.raises(MalformedCms):
        decrypt_enveloped(blob, key)


def test_refuses_truncated_message(recipient):
    d, key = recipient
    blob = openssl_encrypt(d, b"x", KMS_PROFILE)
    with pytest.raises(MalformedCms):
        decrypt_enveloped(blob[:-20], key)


def test_refuses_other_content_types(recipient):
    _, key = recipient
    data = cms.ContentInfo({"content_type": "data", "content": b"plain"}).dump()
    with pytest.raises(UnsupportedCms, match="enveloped_data"):
        decrypt_enveloped(data, key)
