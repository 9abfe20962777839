"""Property tests: a tampered or arbitrary document is refused with an AttestationError, never
accepted and never a crash of another kind."""
from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_bridge.attestation import AttestationError, Expectations, verify
from enclave_bridge.nsm import SimulatedNsm

NSM = SimulatedNsm()
GENUINE = NSM.attest(nonce=b"n" * 32, public_key=b"k" * 64)
EXPECT = Expectations(root=NSM.root_certificate, pcrs={i: NSM.pcrs[i] for i in (0, 1, 2)})
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_genuine_document_verifies():
    assert verify(GENUINE, EXPECT).nonce == b"n" * 32


@FUZZ
@given(position=st.integers(0, len(GENUINE) - 1), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_refused(position, bit):
    tampered = bytearray(GENUINE)
    tampered[position] ^= 1 << bit
    with pytest.raises(AttestationError):
        verify(bytes(tampered), EXPECT)


@FUZZ
@given(cut=st.integers(0, len(GENUINE) - 1))
def test_any_truncation_is_refused(cut):
    with pytest.raises(AttestationError):
        verify(GENUINE[:cut], EXPECT)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.binary(max_size=64) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-50, 50), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(value=cbor_values, tag=st.sampled_from([None, 18, 17, 0]))
def test_arbitrary_cbor_is_refused(value, tag):
    data = cbor2.dumps(value if tag is None else cbor2.CBORTag(tag, value))
    with pytest.raises(AttestationError):
        verify(data, EXPECT)


@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused(data):
    with pytest.raises(AttestationError):
        verify(data, EXPECT)


payload_fields = st.fixed_dictionaries({}, optional={
    "module_id": st.text(max_size=8) | st.integers(),
    "digest": st.sampled_from(["SHA384", "SHA256", ""]) | st.binary(max_size=4),
    "timestamp": st.integers(-5, 2**64) | st.floats(allow_nan=True) | st.text(max_size=3),
    "pcrs": st.dictionaries(st.integers(-2, 40) | st.text(max_size=2), st.binary(max_size=70), max_size=4),
    "cabundle": st.lists(st.binary(max_size=30), max_size=3) | st.binary(max_size=5),
    "certificate": st.binary(max_size=40) | st.none(),
    "nonce": st.binary(max_size=2000) | st.text(max_size=3) | st.none(),
})


@FUZZ
@given(fields=payload_fields)
def test_signed_documents_with_wrong_fields_are_refused(fields):
    """Even correctly signed by the simulator's key, a payload with bad fields never passes."""
    other_image = {i: b"\x07" * 48 for i in (0, 1, 2)}
    with pytest.raises(AttestationError):
        verify(NSM.attest_with(**fields), Expectations(root=NSM.root_certificate, pcrs=other_image))


@FUZZ
@given(value=cbor_values)
def test_any_nsm_response_is_a_document_or_an_nsm_error(value):
    from enclave_bridge.nsm import NsmError, decode_attestation_response
    try:
        document = decode_attestation_response(cbor2.dumps(value))
    except NsmError:
        return
    assert isinstance(document, bytes) and document
