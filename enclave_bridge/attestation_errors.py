"""Why an attestation document was refused: one exception class per refusal.

Every class derives from :class:`AttestationError`, so callers that only need "accepted or not"
catch that; callers that report or count refusals can tell them apart. ``code`` is stable for
logs and APIs.
"""
from __future__ import annotations


class AttestationError(Exception):
    """The attestation document was refused. Never treat any subclass as an accept."""

    code = "attestation_error"


class MalformedDocument(AttestationError):
    """Not CBOR, not a COSE_Sign1, or the payload lacks or mistypes a required field."""

    code = "malformed"


class UnsupportedAlgorithm(MalformedDocument):
    """The COSE protected header names an algorithm other than ES384 (-35)."""

    code = "unsupported_algorithm"


class InvalidSignature(AttestationError):
    """The COSE_Sign1 signature does not verify with the document's own certificate (forged or altered)."""

    code = "invalid_signature"


class UntrustedChain(AttestationError):
    """The document's certificate does not chain to a pinned root."""

    code = "untrusted_chain"


class CertificateExpired(UntrustedChain):
    """A certificate in the chain is outside its validity period at verification time."""

    code = "certificate_expired"


class DebugModeEnclave(AttestationError):
    """The image PCRs (0, 1, 2) are all zero: the enclave runs in debug mode and its memory is readable."""

    code = "debug_mode"


class ImageNotPinned(AttestationError, ValueError):
    """The expectations do not pin the enclave image (PCR0, PCR1 and PCR2), so any image would pass.

    Raised when :class:`~enclave_bridge.attestation.Expectations` are built, before any document
    is looked at: a verifier that would accept any image on a trusted parent refuses to start.
    """

    code = "image_not_pinned"


class PcrMissing(AttestationError):
    """An expected PCR index is absent from the document."""

    code = "pcr_missing"


class PcrMismatch(AttestationError):
    """A PCR differs from the expected measurement (an all-zero PCR outside debug mode included)."""

    code = "pcr_mismatch"


class StaleDocument(AttestationError):
    """The document's timestamp is older than the freshness window allows."""

    code = "stale"


class FutureDocument(StaleDocument):
    """The document's timestamp lies further in the future than the allowed clock skew."""

    code = "future_timestamp"


class NonceMismatch(AttestationError):
    """The document's nonce is not the one the verifier issued."""

    code = "nonce_mismatch"


class NonceMissing(NonceMismatch):
    """A nonce was required (expected value or replay protection) but the document has none."""

    code = "nonce_missing"


class ReplayedNonce(AttestationError):
    """This nonce was already accepted once within the freshness window."""

    code = "replayed_nonce"


class ReplayCacheFull(AttestationError):
    """The replay cache is full of unexpired nonces; refusing rather than forgetting one."""

    code = "replay_cache_full"


class PublicKeyMismatch(AttestationError):
    """The enclave public key bound in the document is not the expected one."""

    code = "public_key_mismatch"


class PublicKeyMissing(PublicKeyMismatch):
    """A public key was required but the document carries none."""

    code = "public_key_missing"


class UserDataMismatch(AttestationError):
    """The document's user_data differs from the expected value."""

    code = "user_data_mismatch"
