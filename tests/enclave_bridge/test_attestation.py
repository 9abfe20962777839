"""The attestation verifier against documents from the simulated NSM: accepts, and each refusal."""
from __future__ import annotations

import datetime as dt
import hashlib

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from enclave_bridge import attestation as att
from enclave_bridge import cose
from enclave_bridge.attestation import Expectations, NonceCache, verify
from enclave_bridge.nsm import REMOVE, NsmError, SimulatedNsm, default_simulated_pcrs


@pytest.fixture(scope="module")
def nsm() -> SimulatedNsm:
    return SimulatedNsm()


def att_image(nsm: SimulatedNsm) -> dict[int, bytes]:
    """The simulated image's PCR0, PCR1 and PCR2 (what nitro-cli build-enclave prints)."""
    return {i: nsm.pcrs[i] for i in (0, 1, 2)}


def expect(nsm: SimulatedNsm, **kwargs) -> Expectations:
    kwargs.setdefault("pcrs", {0: nsm.pcrs[0], 1: nsm.pcrs[1], 2: nsm.pcrs[2]})
    return Expectations(root=nsm.root_certificate, **kwargs)


def sign1_items(document: bytes) -> list:
    """The four COSE_Sign1 items of a document, tagged or not."""
    item = cbor2.loads(document)
    return list(item.value if isinstance(item, cbor2.CBORTag) else item)


def spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- accepts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tagged", [True, False])
def test_accepts_a_good_document_and_returns_its_fields(tagged):
    nsm = SimulatedNsm(tagged=tagged)
    enclave_key = spki(ec.generate_private_key(ec.SECP384R1()).public_key())
    document = nsm.attest(user_data=b"hello", nonce=b"n" * 32, public_key=enclave_key)
    assert isinstance(cbor2.loads(document), cbor2.CBORTag) is tagged

    result = verify(document, expect(nsm, nonce=b"n" * 32, public_key=enclave_key, user_data=b"hello"))

    assert result.module_id == nsm.module_id
    assert result.digest == "SHA384"
    assert result.pcrs == nsm.pcrs and len(result.pcrs[0]) == 48
    assert result.nonce == b"n" * 32 and result.user_data == b"hello" and result.public_key == enclave_key
    assert abs(result.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert result.certificate == nsm.signing_certificate


def test_document_has_the_real_nitro_format(nsm):
    message = cose.decode_sign1(nsm.attest())
    assert message.protected == {1: -35} and len(message.signature) == 96
    payload = cbor2.loads(message.payload)
    assert set(payload) == {"module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
                            "public_key", "user_data", "nonce"}
    assert payload["public_key"] is None and payload["user_data"] is None and payload["nonce"] is None
    assert sorted(payload["pcrs"]) == list(range(16))
    bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    assert bundle[0] == nsm.root_certificate  # cabundle is [root, intermediates...]
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_the_default_webpki_leaf_profile_would_refuse_the_nitro_leaf(nsm):
    """Why the verifier relaxes the end-entity policy: the leaf has no AKI, like the real one."""
    payload = cbor2.loads(cose.decode_sign1(nsm.attest()).payload)
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    strict = (verification.PolicyBuilder().store(verification.Store([nsm.root_certificate]))
              .time(dt.datetime.now(dt.UTC)).build_client_verifier())
    with pytest.raises(verification.VerificationError):
        strict.verify(leaf, bundle)
    verify(nsm.attest(), expect(nsm))  # ours accepts it


def test_accepts_maximum_size_bindings_and_the_nsm_refuses_larger(nsm):
    big = bytes(range(256)) * 4
    result = verify(nsm.attest(user_data=big, nonce=big, public_key=big), expect(nsm))
    assert result.user_data == big
    with pytest.raises(NsmError, match="InputTooLarge: nonce"):
        nsm.attest(nonce=big + b"x")


def test_longer_chains_verify():
    from enclave_bridge.simulated_ca import SimulatedCA
    nsm = SimulatedNsm(ca=SimulatedCA(intermediates=3))
    assert verify(nsm.attest(), expect(nsm)).module_id == nsm.module_id


# -- production trust anchor --------------------------------------------------------------------

def test_bundled_aws_root_is_the_pinned_nitro_root_g1():
    root = att.aws_nitro_root()
    der = root.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest().upper() == (
        "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B")
    assert root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "aws.nitro-enclaves"
    assert isinstance(root.public_key().curve, ec.SECP384R1)
    assert root.not_valid_before_utc.date() == dt.date(2019, 10, 28)
    assert root.not_valid_after_utc.date() == dt.date(2049, 10, 28)


def test_production_expectations_refuse_simulated_documents(nsm):
    with pytest.raises(att.UntrustedChain):
        verify(nsm.attest(), Expectations.aws(pcrs={i: nsm.pcrs[i] for i in (0, 1, 2)}))


# -- refusals -----------------------------------------------------------------------------------

def test_refuses_a_flipped_signature_bit(nsm):
    message = sign1_items(nsm.attest())
    signature = bytearray(message[3])
    signature[10] ^= 1
    forged = cbor2.dumps(cbor2.CBORTag(18, [message[0], message[1], message[2], bytes(signature)]))
    with pytest.raises(att.InvalidSignature):
        verify(forged, expect(nsm))


def test_refuses_an_altered_payload_under_the_original_signature(nsm):
    genuine = sign1_items(nsm.attest())
    payload = cbor2.loads(genuine[2])
    payload["pcrs"][0] = hashlib.sha384(b"attacker image").digest()
    forged = cbor2.dumps(cbor2.CBORTag(18, [genuine[0], genuine[1], cbor2.dumps(payload), genuine[3]]))
    with pytest.raises(att.InvalidSignature):
        verify(forged, expect(nsm, pcrs={**att_image(nsm), 0: payload["pcrs"][0]}))


def test_refuses_a_document_signed_by_another_key_than_its_certificate(nsm):
    forged = nsm.attest_with(signing_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(att.InvalidSignature):
        verify(forged, expect(nsm))


def test_refuses_a_chain_to_another_root(nsm):
    impostor = SimulatedNsm(pcrs=nsm.pcrs)  # same measurements, its own CA
    with pytest.raises(att.UntrustedChain) as refusal:
        verify(impostor.attest(), expect(nsm))
    assert type(refusal.value) is att.UntrustedChain


def test_refuses_a_cabundle_that_claims_the_pinned_root(nsm):
    """Copying the genuine cabundle does not help a certificate from another CA."""
    impostor = SimulatedNsm(pcrs=nsm.pcrs)
    genuine = cbor2.loads(cose.decode_sign1(nsm.attest()).payload)
    with pytest.raises(att.UntrustedChain):
        verify(impostor.attest_with(cabundle=genuine["cabundle"]), expect(nsm))


def test_refuses_an_expired_signing_certificate():
    five_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=5)
    old = SimulatedNsm(clock=lambda: five_hours_ago, leaf_lifetime=dt.timedelta(hours=3))
    document = old.attest()
    with pytest.raises(att.CertificateExpired, match="expired"):
        verify(document, expect(old, max_age=dt.timedelta(days=1)))


def test_refuses_a_certificate_not_yet_valid():
    nsm = SimulatedNsm()
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    future = SimulatedNsm(ca=nsm.ca, clock=lambda: tomorrow)
    with pytest.raises(att.CertificateExpired, match="not valid before"):
        verify(future.attest(), expect(nsm, max_clock_skew=dt.timedelta(days=2)))


def test_refuses_a_wrong_pcr(nsm):
    with pytest.raises(att.PcrMismatch, match="PCR1"):
        verify(nsm.attest(), expect(nsm, pcrs={**att_image(nsm), 1: hashlib.sha384(b"other").digest()}))


def test_refuses_a_missing_pcr(nsm):
    pcrs = {i: v for i, v in nsm.pcrs.items() if i != 8}
    with pytest.raises(att.PcrMissing, match="PCR8"):
        verify(nsm.attest_with(pcrs=pcrs), expect(nsm, pcrs={**att_image(nsm), 8: b"\x01" * 48}))


def test_refuses_all_zero_pcrs_debug_mode():
    debug = SimulatedNsm(pcrs={})  # every PCR zero, as a debug-mode enclave reports
    assert not any(any(v) for v in debug.pcrs.values())
    with pytest.raises(att.DebugModeEnclave):
        verify(debug.attest(), expect(debug, pcrs={i: default_simulated_pcrs()[i] for i in (0, 1, 2)}))


def test_a_zero_pcr_that_the_expectations_name_is_a_mismatch_not_debug_mode(nsm):
    zeroed = dict(nsm.pcrs)
    zeroed[4] = bytes(48)
    with pytest.raises(att.PcrMismatch, match="PCR4 is all zero") as refused:
        verify(nsm.attest_with(pcrs=zeroed), expect(nsm, pcrs={**att_image(nsm), 4: b"\x02" * 48}))
    assert not isinstance(refused.value, att.DebugModeEnclave)


def test_pinning_pcr3_when_the_document_has_it_zero_is_a_mismatch(nsm):
    zeroed = {**nsm.pcrs, 3: bytes(48)}  # no IAM role measured for this parent
    with pytest.raises(att.PcrMismatch, match="PCR3 is all zero") as refused:
        verify(nsm.attest_with(pcrs=zeroed), expect(nsm, pcrs={**att_image(nsm), 3: b"\x03" * 48}))
    assert not isinstance(refused.value, att.DebugModeEnclave)


def test_a_zero_image_pcr_alone_is_a_mismatch_not_debug_mode(nsm):
    zeroed = dict(nsm.pcrs)
    zeroed[2] = bytes(48)
    with pytest.raises(att.PcrMismatch, match="PCR2 is all zero"):
        verify(nsm.attest_with(pcrs=zeroed), expect(nsm))


def test_expectations_never_accept_zero_or_no_pcrs(nsm):
    with pytest.raises(ValueError, match="debug-mode"):
        Expectations(root=nsm.root_certificate, pcrs={**att_image(nsm), 0: bytes(48)})
    with pytest.raises(att.ImageNotPinned, match="not pinned"):
        Expectations(root=nsm.root_certificate, pcrs={})
    with pytest.raises(ValueError, match="not hex"):
        Expectations(root=nsm.root_certificate, pcrs={**att_image(nsm), 0: "zz"})


@pytest.mark.parametrize("pinned", [(0,), (4,), (1, 2), (0, 1), (0, 2, 4)])
def test_expectations_refuse_to_start_unless_pcr0_pcr1_pcr2_are_pinned(nsm, pinned):
    with pytest.raises(att.ImageNotPinned, match="the image is not pinned") as refused:
        Expectations(root=nsm.root_certificate, pcrs={i: nsm.pcrs[i] for i in pinned})
    missing = [f"PCR{i}" for i in (0, 1, 2) if i not in pinned]
    assert ", ".join(missing) in str(refused.value)
    assert refused.value.code == "image_not_pinned"


def test_only_an_explicit_key_policy_subset_may_pin_less(nsm):
    subset = Expectations(root=nsm.root_certificate, pcrs={0: nsm.pcrs[0]}, require_image_pcrs=False)
    assert verify(nsm.attest(), subset).pcrs[0] == nsm.pcrs[0]


MALFORMED = {
    "garbage": lambda nsm: b"\x00not cbor at all",
    "truncated": lambda nsm: nsm.attest()[:-10],
    "trailing bytes": lambda nsm: nsm.attest() + b"\x00",
    "empty": lambda nsm: b"",
    "wrong tag": lambda nsm: cbor2.dumps(cbor2.CBORTag(98, sign1_items(nsm.attest()))),
    "three items": lambda nsm: cbor2.dumps(list(sign1_items(nsm.attest()))[:3]),
    "a map": lambda nsm: cbor2.dumps({"payload": b"x"}),
    "payload not a map": lambda nsm: cose.sign_es384(cbor2.dumps([1, 2]), ec.generate_private_key(ec.SECP384R1())),
    "missing cabundle": lambda nsm: nsm.attest_with(cabundle=REMOVE),
    "missing timestamp": lambda nsm: nsm.attest_with(timestamp=REMOVE),
    "digest SHA256": lambda nsm: nsm.attest_with(digest="SHA256"),
    "short PCR": lambda nsm: nsm.attest_with(pcrs={0: b"\x01" * 20}),
    "text nonce": lambda nsm: nsm.attest_with(nonce="abc"),
    "empty cabundle": lambda nsm: nsm.attest_with(cabundle=[]),
    "certificate not DER": lambda nsm: nsm.attest_with(certificate=b"\x30\x03\x02\x01\x01"),
    "timestamp float": lambda nsm: nsm.attest_with(timestamp=1.5),
    "empty module_id": lambda nsm: nsm.attest_with(module_id=""),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_refuses_malformed_documents(nsm, case):
    with pytest.raises(att.MalformedDocument):
        verify(MALFORMED[case](nsm), expect(nsm))


def test_refuses_a_non_es384_algorithm(nsm):
    genuine = sign1_items(nsm.attest())
    es256 = cbor2.dumps({1: -7})
    with pytest.raises(att.UnsupportedAlgorithm):
        verify(cbor2.dumps([es256, {}, genuine[2], genuine[3]]), expect(nsm))


def test_refuses_a_wrong_nonce_and_a_missing_nonce(nsm):
    with pytest.raises(att.NonceMismatch) as refusal:
        verify(nsm.attest(nonce=b"a" * 16), expect(nsm, nonce=b"b" * 16))
    assert type(refusal.value) is att.NonceMismatch
    with pytest.raises(att.NonceMissing):
        verify(nsm.attest(), expect(nsm, nonce=b"b" * 16))


def test_refuses_a_replayed_nonce(nsm):
    cache = NonceCache()
    expectations = expect(nsm, replay_cache=cache)
    document = nsm.attest(nonce=b"once" * 8)
    verify(document, expectations)
    with pytest.raises(att.ReplayedNonce):
        verify(document, expectations)
    with pytest.raises(att.ReplayedNonce):  # a new document reusing the nonce is a replay too
        verify(nsm.attest(nonce=b"once" * 8), expectations)
    verify(nsm.attest(nonce=b"twice" * 8), expectations)
    with pytest.raises(att.NonceMissing):  # replay protection needs a nonce
        verify(nsm.attest(), expectations)


def test_a_refused_document_does_not_consume_its_nonce(nsm):
    cache = NonceCache()
    bad = expect(nsm, replay_cache=cache, user_data=b"expected")
    with pytest.raises(att.UserDataMismatch):
        verify(nsm.attest(nonce=b"n" * 16, user_data=b"other"), bad)
    verify(nsm.attest(nonce=b"n" * 16), expect(nsm, replay_cache=cache))


def test_a_full_replay_cache_refuses_rather_than_forgets(nsm):
    cache = NonceCache(max_entries=2)
    expectations = expect(nsm, replay_cache=cache)
    verify(nsm.attest(nonce=b"1" * 16), expectations)
    verify(nsm.attest(nonce=b"2" * 16), expectations)
    with pytest.raises(att.ReplayCacheFull):
        verify(nsm.attest(nonce=b"3" * 16), expectations)


def test_refuses_a_stale_timestamp(nsm):
    ten_minutes_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    old = SimulatedNsm(ca=nsm.ca, clock=lambda: ten_minutes_ago)
    with pytest.raises(att.StaleDocument) as refusal:
        verify(old.attest(), expect(nsm, max_age=dt.timedelta(minutes=5)))
    assert type(refusal.value) is att.StaleDocument
    verify(old.attest(), expect(nsm, max_age=dt.timedelta(minutes=15)))


def test_refuses_a_timestamp_from_the_future(nsm):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    with pytest.raises(att.FutureDocument):
        verify(nsm.attest_with(timestamp=int(later.timestamp() * 1000)), expect(nsm))


def test_refuses_a_public_key_mismatch(nsm):
    enclave = ec.generate_private_key(ec.SECP384R1()).public_key()
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert verify(nsm.attest(public_key=spki(enclave)), expect(nsm, public_key=enclave)).public_key == spki(enclave)
    with pytest.raises(att.PublicKeyMismatch) as refusal:
        verify(nsm.attest(public_key=spki(enclave)), expect(nsm, public_key=other))
    assert type(refusal.value) is att.PublicKeyMismatch
    with pytest.raises(att.PublicKeyMissing):
        verify(nsm.attest(), expect(nsm, require_public_key=True))


def test_refuses_a_user_data_mismatch(nsm):
    with pytest.raises(att.UserDataMismatch):
        verify(nsm.attest(user_data=b"request-1"), expect(nsm, user_data=b"request-2"))
    with pytest.raises(att.UserDataMismatch):
        verify(nsm.attest(), expect(nsm, user_data=b"request-2"))


def test_every_refusal_is_an_attestation_error_with_its_own_code():
    classes = [c for c in vars(att).values() if isinstance(c, type) and issubclass(c, att.AttestationError)]
    codes = [c.code for c in classes]
    assert len(classes) >= 18 and len(set(codes)) == len(codes)


def test_openssl_accepts_the_simulator_chain_independently(nsm, tmp_path):
    """The simulated PKI is sound X.509 by another implementation's rules, not only ours."""
    import subprocess
    payload = cbor2.loads(cose.decode_sign1(nsm.attest()).payload)
    pem = lambda der: x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (tmp_path / "root.pem").write_bytes(pem(payload["cabundle"][0]))
    (tmp_path / "chain.pem").write_bytes(b"".join(pem(c) for c in payload["cabundle"][1:]))
    (tmp_path / "leaf.pem").write_bytes(pem(payload["certificate"]))
    def openssl_verify(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", *flags, "-CAfile", str(tmp_path / "root.pem"),
                               "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True, timeout=60)

    done = openssl_verify()
    assert done.returncode == 0 and ": OK" in done.stdout, done.stdout + done.stderr
    strict = openssl_verify("-x509_strict")  # like the real Nitro leaf, ours lacks an AKI
    assert strict.returncode != 0 and "Missing Authority Key Identifier" in strict.stdout + strict.stderr
    other = SimulatedNsm()
    (tmp_path / "other-root.pem").write_bytes(other.root_certificate.public_bytes(serialization.Encoding.PEM))
    refused = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "other-root.pem"),
                              "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
