"""KMS Decrypt for an enclave recipient: the boto3 request shape, and the local stand-in's key policy."""
from __future__ import annotations

import hashlib
import json

import boto3
import pytest
from botocore.stub import Stubber

from enclave_bridge import cms
from enclave_bridge.kms import (
    AttestedDocument,
    Boto3KmsClient,
    KeyPolicy,
    KmsAccessDenied,
    KmsError,
    KmsInvalidCiphertext,
    KmsMissingRecipient,
    LocalKms,
    decrypt_with_attestation,
)
from tests.support.enclave_broker_attest import GOOD_PCRS, make_nsm, verifier_for


def kms_client():
    return boto3.client("kms", region_name="eu-west-2", aws_access_key_id="AKIDEXAMPLE",
                        aws_secret_access_key="secret")


def test_boto3_adapter_sends_the_recipient_shape_kms_expects():
    client = kms_client()
    envelope = b"\x30\x80cms"
    with Stubber(client) as stub:
        stub.add_response("decrypt", {"KeyId": "arn:aws:kms:eu-west-2:1:key/k", "CiphertextForRecipient": envelope,
                                      "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
                          expected_params={
                              "CiphertextBlob": b"blob",
                              "KeyId": "alias/broker-seed",
                              "EncryptionContext": {"purpose": "broker-seed"},
                              "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                            "AttestationDocument": b"document"},
                          })
        out = Boto3KmsClient(client).decrypt_for_recipient(
            b"blob", b"document", key_id="alias/broker-seed", encryption_context={"purpose": "broker-seed"})
        stub.assert_no_pending_responses()
    assert out == envelope


def test_boto3_adapter_omits_optional_fields():
    client = kms_client()
    with Stubber(client) as stub:
        stub.add_response("decrypt", {"CiphertextForRecipient": b"x"},
                          expected_params={"CiphertextBlob": b"blob",
                                           "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                                                         "AttestationDocument": b"doc"}})
        assert Boto3KmsClient(client).decrypt_for_recipient(b"blob", b"doc") == b"x"


def test_boto3_adapter_maps_access_denied():
    client = kms_client()
    with Stubber(client) as stub:
        stub.add_client_error("decrypt", service_error_code="AccessDeniedException",
                              service_message="PCR0 mismatch", http_status_code=400)
        with pytest.raises(KmsAccessDenied, match="PCR0 mismatch"):
            Boto3KmsClient(client).decrypt_for_recipient(b"blob", b"doc")


def test_boto3_adapter_refuses_a_plaintext_answer():
    client = kms_client()
    with Stubber(client) as stub:
        stub.add_response("decrypt", {"Plaintext": b"secret", "CiphertextForRecipient": b"x"})
        with pytest.raises(KmsError, match="Plaintext"):
            Boto3KmsClient(client).decrypt_for_recipient(b"blob", b"doc")
        stub.add_response("decrypt", {"KeyId": "k"})
        with pytest.raises(KmsError, match="no CiphertextForRecipient"):
            Boto3KmsClient(client).decrypt_for_recipient(b"blob", b"doc")


@pytest.fixture
def enclave():
    nsm = make_nsm()
    kms = LocalKms(verifier_for(nsm))
    key_id = kms.create_key(KeyPolicy.for_pcrs({0: GOOD_PCRS[0], 2: GOOD_PCRS[2]}))
    return nsm, kms, key_id


def test_releases_secret_to_an_enclave_whose_pcrs_match(enclave):
    nsm, kms, key_id = enclave
    blob = kms.encrypt(key_id, b"k8s signing key", {"purpose": "seed"})
    assert decrypt_with_attestation(kms, nsm, blob, encryption_context={"purpose": "seed"}) == b"k8s signing key"


def test_answer_is_cms_only_the_documents_key_opens(enclave):
    nsm, kms, key_id = enclave
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = mine.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    envelope = kms.decrypt_for_recipient(kms.encrypt(key_id, b"s"), nsm.attest(None, b"n", spki))
    assert cms.decrypt_enveloped(envelope, mine) == b"s"
    with pytest.raises(cms.WrongRecipient):
        cms.decrypt_enveloped(envelope, other)


def test_refuses_an_enclave_with_other_pcrs(enclave):
    nsm, kms, key_id = enclave
    blob = kms.encrypt(key_id, b"secret")
    evil = make_nsm({**GOOD_PCRS, 0: hashlib.sha384(b"malicious image").digest()}, like=nsm)
    with pytest.raises(KmsAccessDenied, match="PcrMismatch: PCR0"):
        decrypt_with_attestation(kms, evil, blob)
    missing = make_nsm({0: GOOD_PCRS[0]}, like=nsm)  # PCR2 not measured (zero)
    with pytest.raises(KmsAccessDenied, match="PCR2"):
        decrypt_with_attestation(kms, missing, blob)


def test_key_policy_check_on_its_own():
    """The key policy re-checks what the verifier returned (defence in depth), with its own words."""
    policy = KeyPolicy.for_pcrs({0: GOOD_PCRS[0], 2: GOOD_PCRS[2]})
    policy.check(AttestedDocument(pcrs=dict(GOOD_PCRS), public_key=b"k"))
    with pytest.raises(KmsAccessDenied, match="ImageSha384 does not match"):
        policy.check(AttestedDocument(pcrs={**GOOD_PCRS, 0: b"\x02" * 48}, public_key=b"k"))
    with pytest.raises(KmsAccessDenied, match="no PCR2, required by kms:RecipientAttestation:PCR2"):
        policy.check(AttestedDocument(pcrs={0: GOOD_PCRS[0]}, public_key=b"k"))


def test_refuses_a_forged_document(enclave):
    nsm, kms, key_id = enclave
    forger = make_nsm()  # same PCRs, but not signed by the trusted NSM
    with pytest.raises(KmsAccessDenied, match="UntrustedChain"):
        decrypt_with_attestation(kms, forger, kms.encrypt(key_id, b"secret"))
    with pytest.raises(KmsAccessDenied, match="MalformedDocument"):
        kms.decrypt_for_recipient(kms.encrypt(key_id, b"secret"), b"\xa0garbage")
    from cryptography.hazmat.primitives.asymmetric import ec
    spki = make_spki()
    resigned = nsm.attest_with(public_key=spki, signing_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KmsAccessDenied, match="InvalidSignature"):
        kms.decrypt_for_recipient(kms.encrypt(key_id, b"secret"), resigned)


def make_spki() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_refuses_without_a_recipient(enclave):
    nsm, kms, key_id = enclave
    blob = kms.encrypt(key_id, b"secret")
    with pytest.raises(KmsMissingRecipient):
        kms.decrypt_for_recipient(blob, b"")
    with pytest.raises(KmsMissingRecipient, match="no public key"):
        kms.decrypt_for_recipient(blob, nsm.attest(None, b"n", None))
    with pytest.raises(KmsMissingRecipient, match="attested recipient"):
        kms.decrypt(blob)


def test_refuses_wrong_context_or_tampered_blob(enclave):
    nsm, kms, key_id = enclave
    blob = kms.encrypt(key_id, b"secret", {"purpose": "seed"})
    with pytest.raises(KmsInvalidCiphertext):
        decrypt_with_attestation(kms, nsm, blob, encryption_context={"purpose": "other"})
    with pytest.raises(KmsInvalidCiphertext):
        decrypt_with_attestation(kms, nsm, blob[:-1] + bytes([blob[-1] ^ 1]), encryption_context={"purpose": "seed"})
    other_key = kms.create_key(KeyPolicy.for_pcrs(GOOD_PCRS))
    with pytest.raises(KmsInvalidCiphertext, match="made by key"):
        decrypt_with_attestation(kms, nsm, blob, key_id=other_key, encryption_context={"purpose": "seed"})


def test_key_policy_from_aws_json_and_its_refusals():
    pcr0 = GOOD_PCRS[0].hex()
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:role/broker"}, "Action": "kms:Decrypt",
         "Resource": "*", "Condition": {"StringEqualsIgnoreCase": {
             "kms:RecipientAttestation:ImageSha384": pcr0.upper(),
             "kms:RecipientAttestation:PCR8": GOOD_PCRS[1].hex()}}}]}
    policy = KeyPolicy.from_aws_json(json.dumps(doc))
    assert policy.conditions == {"kms:RecipientAttestation:ImageSha384": pcr0,
                                 "kms:RecipientAttestation:PCR8": GOOD_PCRS[1].hex()}
    with pytest.raises(ValueError, match="no kms:RecipientAttestation"):
        KeyPolicy.from_aws_json({"Statement": [{"Effect": "Allow", "Action": "kms:Decrypt"}]})
    with pytest.raises(ValueError, match="all zeros"):
        KeyPolicy.for_pcrs({0: bytes(48)})
    with pytest.raises(ValueError, match="SHA-384"):
        KeyPolicy({"kms:RecipientAttestation:PCR1": "abcd"})
    with pytest.raises(ValueError, match="unsupported"):
        KeyPolicy({"kms:RecipientAttestation:Other": pcr0})


def test_boto3_encrypter_request_shape_and_a_sealed_bundle_round_trip():
    from enclave_bridge.kms import boto3_encrypter
    client = kms_client()
    with Stubber(client) as stub:
        stub.add_response("encrypt", {"CiphertextBlob": b"wrapped", "KeyId": "k"},
                          expected_params={"KeyId": "alias/broker-seeds", "Plaintext": b"data-key",
                                           "EncryptionContext": {"purpose": "mpa-broker-seeds"}})
        assert boto3_encrypter(client, "alias/broker-seeds")(b"data-key", {"purpose": "mpa-broker-seeds"}) == b"wrapped"
        stub.add_client_error("encrypt", service_error_code="NotFoundException", service_message="no key")
        from enclave_bridge.kms import KmsNotFound
        with pytest.raises(KmsNotFound, match="no key"):
            boto3_encrypter(client, "alias/none")(b"x", {})


def test_the_runbooks_key_policy_pins_the_whole_image():
    """docs/enclave-broker.md's seed-key policy, read the way the local KMS reads key policies."""
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "enclave-broker.md").read_text()
    block = re.search(r"`seed-key-policy.json`.*?```json\n(.*?)```", doc, re.S).group(1)
    image = {0: GOOD_PCRS[0].hex(), 1: GOOD_PCRS[1].hex(), 2: GOOD_PCRS[2].hex()}
    for index, value in image.items():
        block = block.replace(f"<PCR{index}>", value)
    policy = KeyPolicy.from_aws_json(block)
    assert policy.pcrs() == {i: bytes.fromhex(v) for i, v in image.items()}
