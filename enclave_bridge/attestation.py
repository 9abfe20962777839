"""Verify a Nitro attestation document against what you expect of the enclave.

    from enclave_bridge.attestation import Expectations, verify
    expected = Expectations.aws(pcrs={0: pcr0_hex, 1: pcr1_hex, 2: pcr2_hex}, nonce=my_nonce)
    att = verify(document_bytes, expected)      # raises an AttestationError subclass on refusal
    att.public_key, att.user_data, att.pcrs      # only trustworthy after verify() returned

Expectations must pin the image: PCR0 (the enclave image file), PCR1 (kernel and bootstrap) and
PCR2 (the application), the three values ``nitro-cli build-enclave`` prints; otherwise they refuse
to be built (:class:`ImageNotPinned`). Only the KMS stand-in, which checks a key policy's own
conditions afterwards, opts out with ``require_image_pcrs=False``.

Checks, in order (the first failure raises; each has its own exception class):
COSE_Sign1 structure and ES384 (:class:`MalformedDocument`, :class:`UnsupportedAlgorithm`),
the payload's fields (:class:`MalformedDocument`), the signature by the document's certificate
(:class:`InvalidSignature`), that certificate's chain to a pinned root at the verifier's clock
(:class:`UntrustedChain`, :class:`CertificateExpired`), debug-mode all-zero image PCRs
(:class:`DebugModeEnclave`), expected PCRs (:class:`PcrMissing`, :class:`PcrMismatch`; a single
zero PCR outside debug mode is a mismatch), the
timestamp's freshness (:class:`StaleDocument`, :class:`FutureDocument`), nonce
(:class:`NonceMissing`, :class:`NonceMismatch`), public key (:class:`PublicKeyMissing`,
:class:`PublicKeyMismatch`), user data (:class:`UserDataMismatch`), and last the replay cache
(:class:`ReplayedNonce`), which records a nonce only once everything else passed.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import threading
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Mapping as _AnyMap
from dataclasses import dataclass, field
from importlib import resources

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedAlgorithmError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from . import cose
from .attestation_errors import (
    AttestationError,
    CertificateExpired,
    DebugModeEnclave,
    FutureDocument,
    ImageNotPinned,
    InvalidSignature,
    MalformedDocument,
    NonceMismatch,
    NonceMissing,
    PcrMismatch,
    PcrMissing,
    PublicKeyMismatch,
    PublicKeyMissing,
    ReplayCacheFull,
    ReplayedNonce,
    StaleDocument,
    UnsupportedAlgorithm,
    UntrustedChain,
    UserDataMismatch,
)

__all__ = [
    "AWS_NITRO_ROOT_G1_SHA256", "AttestationError", "CertificateExpired", "DebugModeEnclave",
    "Expectations", "FutureDocument", "IMAGE_PCRS", "ImageNotPinned", "InvalidSignature", "MalformedDocument", "NonceCache",
    "NonceMismatch", "NonceMissing", "PcrMismatch", "PcrMissing", "PublicKeyMismatch",
    "PublicKeyMissing", "ReplayCacheFull", "ReplayedNonce", "StaleDocument", "UnsupportedAlgorithm",
    "UntrustedChain", "UserDataMismatch", "VerifiedAttestation", "aws_nitro_root", "parse_payload",
    "verify",
]

#: DER SHA-256 fingerprint of the AWS Nitro Enclaves Root G1 (AWS documentation, "Verify the root").
AWS_NITRO_ROOT_G1_SHA256 = bytes.fromhex(
    "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B")
#: The PCRs that measure the image (AWS: PCR0 enclave image file, PCR1 Linux kernel and bootstrap,
#: PCR2 application); all three must be pinned, and all three zero means debug mode.
IMAGE_PCRS = (0, 1, 2)
_MAX_BINDING_BYTES = 1024
_MAX_CERT_BYTES = 1024


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 shipped with this package, checked against its pinned fingerprint."""
    pem = resources.files(__package__).joinpath("aws_nitro_root_g1.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).digest() != AWS_NITRO_ROOT_G1_SHA256:
        raise RuntimeError("the bundled AWS Nitro root does not match its pinned SHA-256 fingerprint")
    return cert


@dataclass(frozen=True)
class VerifiedAttestation:
    """The fields of a document that passed every check."""

    module_id: str
    digest: str
    timestamp: dt.datetime
    pcrs: Mapping[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    certificate: x509.Certificate
    cabundle: tuple[x509.Certificate, ...] = ()


class NonceCache:
    """Nonces already accepted, remembered until the freshness window would refuse them anyway.

    Bounded: when full of unexpired nonces it refuses (:class:`ReplayCacheFull`) rather than
    forgetting one, which would reopen a replay. Thread-safe.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._seen: dict[bytes, dt.datetime] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, nonce: bytes) -> bool:
        return nonce in self._seen

    def add(self, nonce: bytes, *, now: dt.datetime, forget_after: dt.datetime) -> None:
        """Record ``nonce``; raise :class:`ReplayedNonce` if it is already there (and not yet expired)."""
        with self._lock:
            expiry = self._seen.get(nonce)
            if expiry is not None and expiry > now:
                raise ReplayedNonce(f"nonce {nonce[:16].hex()}... was already used in an accepted document")
            if len(self._seen) >= self.max_entries:
                self._seen = {n: e for n, e in self._seen.items() if e > now}
                if len(self._seen) >= self.max_entries:
                    raise ReplayCacheFull(f"replay cache holds {len(self._seen)} unexpired nonces; refusing")
            self._seen[nonce] = forget_after


def _as_bytes(name: str, value: bytes | bytearray | str) -> bytes:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError as e:
            raise ValueError(f"{name}: not hex: {value!r}") from e
    return bytes(value)


def _spki_der(value: bytes | str | object) -> bytes:
    if isinstance(value, (bytes, bytearray, str)):
        return _as_bytes("public_key", value)
    return value.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Expectations:
    """What a document must show to be accepted.

    root:        pinned trust anchor(s): :func:`aws_nitro_root` in production, the simulator's in tests.
    pcrs:        index -> expected value (bytes or hex); must include PCR0, PCR1 and PCR2 (the
                 image as ``nitro-cli build-enclave`` prints it) unless ``require_image_pcrs`` is
                 False. Zero values are refused.
    require_image_pcrs: False only for a KMS key policy's own subset of conditions (the stand-in
                 KMS); every verifier that decides whether to trust an enclave keeps it True.
    nonce:       the nonce this verifier issued, or None when not bound to one.
    public_key:  the expected enclave public key (DER SubjectPublicKeyInfo bytes or a key object);
                 ``require_public_key`` only demands that one is present.
    user_data:   expected user_data, or None.
    max_age / max_clock_skew: freshness window for the document's timestamp.
    replay_cache: when set, every document must carry a nonce never accepted before.
    clock:       "now" for freshness and certificate validity.
    """

    root: x509.Certificate | Sequence[x509.Certificate]
    pcrs: Mapping[int, bytes | str]
    nonce: bytes | None = None
    public_key: bytes | str | object | None = None
    require_public_key: bool = False
    user_data: bytes | None = None
    max_age: dt.timedelta = dt.timedelta(minutes=5)
    max_clock_skew: dt.timedelta = dt.timedelta(seconds=30)
    replay_cache: NonceCache | None = None
    clock: Callable[[], dt.datetime] = field(default=_utcnow)
    require_image_pcrs: bool = True

    def __post_init__(self) -> None:
        roots = (self.root,) if isinstance(self.root, x509.Certificate) else tuple(self.root)
        if not roots or not all(isinstance(r, x509.Certificate) for r in roots):
            raise ValueError("Expectations.root: pin at least one x509.Certificate")
        object.__setattr__(self, "root", roots)
        if not self.pcrs:
            raise ImageNotPinned("Expectations.pcrs: the image is not pinned: expect PCR0, PCR1 and PCR2 "
                                 "(the values nitro-cli build-enclave prints)")
        if self.require_image_pcrs:
            unpinned = [f"PCR{i}" for i in IMAGE_PCRS if i not in self.pcrs]
            if unpinned:
                raise ImageNotPinned(f"Expectations.pcrs: the image is not pinned: {', '.join(unpinned)} "
                                     "missing (pin PCR0, PCR1 and PCR2 as nitro-cli build-enclave prints them)")
        pcrs: dict[int, bytes] = {}
        for index, value in self.pcrs.items():
            raw = _as_bytes(f"PCR{index}", value)
            if not isinstance(index, int) or not 0 <= index < 32:
                raise ValueError(f"PCR index {index!r} is not in 0..31")
            if len(raw) not in (32, 48, 64):
                raise ValueError(f"PCR{index}: expected value is {len(raw)} bytes, not 32, 48 or 64")
            if not any(raw):
                raise ValueError(f"PCR{index}: an all-zero expected value would accept debug-mode enclaves")
            pcrs[index] = raw
        object.__setattr__(self, "pcrs", pcrs)
        if self.public_key is not None:
            object.__setattr__(self, "public_key", _spki_der(self.public_key))
        if self.max_age <= dt.timedelta(0):
            raise ValueError("Expectations.max_age must be positive")

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The pinned trust anchor(s), as a tuple."""
        return (self.root,) if isinstance(self.root, x509.Certificate) else tuple(self.root)

    @classmethod
    def aws(cls, pcrs: Mapping[int, bytes | str], **kwargs) -> Expectations:
        """Production expectations: documents must chain to the AWS Nitro Enclaves Root G1."""
        return cls(root=aws_nitro_root(), pcrs=pcrs, **kwargs)


# -- payload ------------------------------------------------------------------------------------

_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")


def parse_payload(payload: bytes) -> dict:
    """Decode and type-check the attestation payload (the AWS attestation-process syntax rules)."""
    try:
        doc = cose.loads_strict(payload)
    except cose.CoseFormatError as e:
        raise MalformedDocument(f"attestation payload: {e}") from e
    if not isinstance(doc, _AnyMap):
        raise MalformedDocument("attestation payload is not a map")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise MalformedDocument(f"attestation payload lacks {', '.join(missing)}")
    if not isinstance(doc["module_id"], str) or not doc["module_id"]:
        raise MalformedDocument("module_id must be a non-empty text string")
    if doc["digest"] != "SHA384":
        raise MalformedDocument(f"digest is {doc['digest']!r}, expected 'SHA384'")
    if type(doc["timestamp"]) is not int or doc["timestamp"] <= 0:
        raise MalformedDocument("timestamp must be a positive integer (milliseconds since the epoch)")
    pcrs = doc["pcrs"]
    if not isinstance(pcrs, _AnyMap) or not 1 <= len(pcrs) <= 32:
        raise MalformedDocument("pcrs must be a map of 1 to 32 entries")
    for index, value in pcrs.items():
        if type(index) is not int or not 0 <= index < 32:
            raise MalformedDocument(f"PCR index {index!r} is not an integer in 0..31")
        if not isinstance(value, bytes) or len(value) not in (32, 48, 64):
            raise MalformedDocument(f"PCR{index} must be a 32, 48 or 64-byte string")
    if not isinstance(doc["certificate"], bytes) or not 1 <= len(doc["certificate"]) <= _MAX_CERT_BYTES:
        raise MalformedDocument("certificate must be a DER byte string of 1..1024 bytes")
    bundle = doc["cabundle"]
    if not isinstance(bundle, (list, tuple)) or not bundle:
        raise MalformedDocument("cabundle must be a non-empty array")
    if not all(isinstance(c, bytes) and 1 <= len(c) <= _MAX_CERT_BYTES for c in bundle):
        raise MalformedDocument("every cabundle entry must be a DER byte string of 1..1024 bytes")
    for name in _OPTIONAL:
        value = doc.get(name)
        if value is not None and (not isinstance(value, bytes) or len(value) > _MAX_BINDING_BYTES):
            raise MalformedDocument(f"{name} must be null or a byte string of at most 1024 bytes")
    doc = dict(doc)
    doc["pcrs"] = dict(pcrs)
    return doc


def _load_der(what: str, der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as e:
        raise MalformedDocument(f"{what} is not a DER X.509 certificate: {e}") from e


# -- chain --------------------------------------------------------------------------------------

def _chain_policy_builder(roots: Sequence[x509.Certificate], now: dt.datetime) -> verification.PolicyBuilder:
    # The real NSM leaf has no Authority Key Identifier (and no SAN or EKU); the WebPKI end-entity
    # profile requires an AKI. Relax exactly that for the leaf and keep the CA profile as is.
    ee_policy = (
        verification.ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None)
        .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    )
    return (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(now)
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
    )


def _verify_chain(leaf: x509.Certificate, bundle: list[x509.Certificate],
                  roots: Sequence[x509.Certificate], now: dt.datetime) -> None:
    verifier = _chain_policy_builder(roots, now).build_client_verifier()
    try:
        verifier.verify(leaf, bundle)
    except verification.VerificationError as e:
        for cert in [leaf, *bundle]:
            if now > cert.not_valid_after_utc:
                raise CertificateExpired(
                    f"certificate {cert.subject.rfc4514_string()} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
                ) from e
            if now < cert.not_valid_before_utc:
                raise CertificateExpired(
                    f"certificate {cert.subject.rfc4514_string()} is not valid before "
                    f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}") from e
        raise UntrustedChain(f"document certificate does not chain to a pinned root: {e}") from e


# -- verify -------------------------------------------------------------------------------------

def verify(document: bytes, expectations: Expectations) -> VerifiedAttestation:
    """Verify ``document`` (COSE_Sign1 bytes) or raise the :class:`AttestationError` naming why not."""
    try:
        message = cose.decode_sign1(document)
    except cose.CoseFormatError as e:
        raise MalformedDocument(f"not a COSE_Sign1 attestation document: {e}") from e
    if message.algorithm != cose.ES384:
        raise UnsupportedAlgorithm(f"COSE algorithm {message.algorithm!r} is not ES384 (-35)")
    doc = parse_payload(message.payload)
    leaf = _load_der("certificate", doc["certificate"])
    bundle = [_load_der(f"cabundle[{i}]", der) for i, der in enumerate(doc["cabundle"])]

    try:
        leaf_key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithmError) as e:
        raise MalformedDocument(f"document certificate carries an unusable public key: {e}") from e
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(leaf_key.curve, ec.SECP384R1):
        raise InvalidSignature("document certificate key is not P-384, so it cannot carry an ES384 signature")
    if not cose.verify_es384(message, leaf_key):
        raise InvalidSignature("COSE_Sign1 signature does not verify with the document's certificate")

    now = expectations.clock()
    if now.tzinfo is None:  # a naive clock is taken as UTC, as cryptography does
        now = now.replace(tzinfo=dt.UTC)
    _verify_chain(leaf, bundle, expectations.roots, now)

    pcrs: dict[int, bytes] = doc["pcrs"]
    if all(index in pcrs and not any(pcrs[index]) for index in IMAGE_PCRS):
        raise DebugModeEnclave("PCR0, PCR1 and PCR2 are all zero: the enclave runs in debug mode")
    for index, value in expectations.pcrs.items():
        expected = _as_bytes(f"PCR{index}", value)  # already bytes since __post_init__
        if index not in pcrs:
            raise PcrMissing(f"document has no PCR{index}")
        if not any(pcrs[index]):  # not debug mode (checked above): an unmeasured register
            raise PcrMismatch(f"PCR{index} is all zero (unmeasured), expected {expected.hex()}")
        if not hmac.compare_digest(pcrs[index], expected):
            raise PcrMismatch(f"PCR{index} is {pcrs[index].hex()}, expected {expected.hex()}")

    timestamp = dt.datetime.fromtimestamp(doc["timestamp"] / 1000, dt.UTC)
    if timestamp > now + expectations.max_clock_skew:
        raise FutureDocument(f"document timestamp {timestamp.isoformat()} is ahead of now ({now.isoformat()})")
    if now - timestamp > expectations.max_age:
        raise StaleDocument(f"document from {timestamp.isoformat()} is older than {expectations.max_age}")

    nonce: bytes | None = doc.get("nonce")
    if expectations.nonce is not None or expectations.replay_cache is not None:
        if nonce is None:
            raise NonceMissing("document carries no nonce but one is required")
    if expectations.nonce is not None and (nonce is None or not hmac.compare_digest(nonce, expectations.nonce)):
        raise NonceMismatch("document nonce differs from the one issued")

    public_key: bytes | None = doc.get("public_key")
    if expectations.public_key is not None or expectations.require_public_key:
        if public_key is None:
            raise PublicKeyMissing("document binds no public key but one is required")
    if expectations.public_key is not None and (
            public_key is None or not hmac.compare_digest(public_key, _spki_der(expectations.public_key))):
        raise PublicKeyMismatch("document binds a different public key than expected")

    user_data = doc.get("user_data")
    if expectations.user_data is not None and (
            user_data is None or not hmac.compare_digest(user_data, expectations.user_data)):
        raise UserDataMismatch("document user_data differs from the expected value")

    if expectations.replay_cache is not None and nonce is not None:  # None was refused above
        expectations.replay_cache.add(nonce, now=now,
                                      forget_after=timestamp + expectations.max_age + expectations.max_clock_skew)

    return VerifiedAttestation(
        module_id=doc["module_id"], digest=doc["digest"], timestamp=timestamp, pcrs=dict(pcrs),
        public_key=public_key, user_data=user_data, nonce=nonce, certificate=leaf, cabundle=tuple(bundle),
    )
