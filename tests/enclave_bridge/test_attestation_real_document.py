"""A genuine AWS Nitro attestation document (us-east-1, 2024-07-16, published as sample data in
public source code) against the verifier and the bundled, fingerprint-pinned AWS root.

Its signing certificate expired three hours after issue, so it verifies only with the verifier's
clock set back to the document's own time; today it must be refused as expired.
"""
from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.x509 import verification

from enclave_bridge import attestation as att
from enclave_bridge import cose
from enclave_bridge.attestation import Expectations, verify
from enclave_bridge.nsm import SimulatedNsm

DOCUMENT = base64.b64decode((Path(__file__).parent / "data" / "aws_nitro_attestation_2024-07-16.b64").read_text())
PAYLOAD = cbor2.loads(cose.decode_sign1(DOCUMENT).payload)
ISSUED = dt.datetime.fromtimestamp(PAYLOAD["timestamp"] / 1000, dt.UTC)
PCR0 = bytes.fromhex("c8275c3e3cd96b3cb256ae55ef8ce52b2dac4601bbd7698efbb76717b4a77c9473d9fc6b2ea93d7d4cff0fb800e675bf")
#: The image as nitro-cli build-enclave would print it: PCR0, PCR1, PCR2.
IMAGE = {0: PCR0, 1: PAYLOAD["pcrs"][1], 2: PAYLOAD["pcrs"][2]}


def at_issue_time(**kwargs) -> Expectations:
    kwargs.setdefault("pcrs", IMAGE)
    return Expectations.aws(clock=lambda: ISSUED + dt.timedelta(seconds=5), **kwargs)


def test_real_document_verifies_against_the_pinned_aws_root():
    result = verify(DOCUMENT, at_issue_time())
    assert result.module_id == "i-059e862454f4a8d8f-enc0190a2f1964172e6"
    assert result.timestamp == ISSUED and ISSUED.date() == dt.date(2024, 7, 16)
    assert result.pcrs[0] == PCR0 and len(result.pcrs) == 16
    assert result.nonce is None and len(result.user_data) == 32 and result.public_key == PAYLOAD["public_key"]
    assert len(result.cabundle) == 4 and result.cabundle[0] == att.aws_nitro_root()


def test_real_document_has_the_shape_the_simulator_imitates():
    message = cose.decode_sign1(DOCUMENT)
    assert not message.tagged and message.protected == {1: -35} and len(message.signature) == 96
    simulated = cbor2.loads(cose.decode_sign1(SimulatedNsm().attest()).payload)
    assert set(PAYLOAD) == set(simulated)
    leaf = x509.load_der_x509_certificate(PAYLOAD["certificate"])
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_the_real_leaf_needs_the_relaxed_end_entity_policy():
    leaf = x509.load_der_x509_certificate(PAYLOAD["certificate"])
    bundle = [x509.load_der_x509_certificate(c) for c in PAYLOAD["cabundle"]]
    strict = (verification.PolicyBuilder().store(verification.Store([att.aws_nitro_root()]))
              .time(ISSUED).build_client_verifier())
    with pytest.raises(verification.VerificationError):
        strict.verify(leaf, bundle)


def test_real_document_is_refused_today_as_expired():
    with pytest.raises(att.CertificateExpired):
        verify(DOCUMENT, Expectations.aws(pcrs=IMAGE, max_age=dt.timedelta(days=36500)))


def test_real_document_is_refused_against_another_root():
    with pytest.raises(att.UntrustedChain):
        verify(DOCUMENT, Expectations(root=SimulatedNsm().root_certificate, pcrs=IMAGE,
                                      clock=lambda: ISSUED + dt.timedelta(seconds=5)))


def test_real_document_with_another_image_measurement_is_refused():
    with pytest.raises(att.PcrMismatch):
        verify(DOCUMENT, at_issue_time(pcrs={**IMAGE, 0: b"\x11" * 48}))


def test_real_document_tampered_is_refused():
    tampered = bytearray(DOCUMENT)
    tampered[tampered.index(b"module_id") + 20] ^= 1  # one bit of the module id
    with pytest.raises(att.InvalidSignature):
        verify(bytes(tampered), at_issue_time())


def test_real_document_is_stale_after_the_freshness_window():
    late = Expectations.aws(pcrs=IMAGE, clock=lambda: ISSUED + dt.timedelta(minutes=10))
    with pytest.raises(att.StaleDocument):
        verify(DOCUMENT, late)


def test_a_naive_utc_clock_is_read_as_utc():
    naive = (ISSUED + dt.timedelta(seconds=5)).replace(tzinfo=None)
    assert verify(DOCUMENT, Expectations.aws(pcrs=IMAGE, clock=lambda: naive)).pcrs[0] == PCR0


def test_pinning_only_the_parent_instance_is_refused_before_any_document_is_read():
    # Issue 11: PCR4 (the parent instance) alone accepted this genuine document, so any image on
    # that instance would have passed. Expectations without the image now refuse to be built.
    with pytest.raises(att.ImageNotPinned, match="PCR0, PCR1, PCR2 missing"):
        at_issue_time(pcrs={4: PAYLOAD["pcrs"][4]})
    with pytest.raises(att.ImageNotPinned, match="PCR2 missing"):
        at_issue_time(pcrs={0: PCR0, 1: PAYLOAD["pcrs"][1]})


def test_pinning_a_pcr_the_genuine_document_leaves_zero_is_a_mismatch_not_debug_mode():
    assert not any(PAYLOAD["pcrs"][8]) and any(PCR0)  # PCR8 (signing certificate): an unsigned image
    with pytest.raises(att.PcrMismatch, match="PCR8 is all zero") as refused:
        verify(DOCUMENT, at_issue_time(pcrs={**IMAGE, 8: b"\x08" * 48}))
    assert not isinstance(refused.value, att.DebugModeEnclave)


def test_the_genuine_document_with_the_whole_image_and_parent_pinned_verifies():
    pinned = {**IMAGE, 4: PAYLOAD["pcrs"][4]}
    assert verify(DOCUMENT, at_issue_time(pcrs=pinned)).pcrs[4] == PAYLOAD["pcrs"][4]
