"""The slice of COSE (RFC 9052) that Nitro attestation documents use: COSE_Sign1 with ES384.

A document is ``[protected: bstr, unprotected: map, payload: bstr, signature: bstr]``, either
bare or under CBOR tag 18. The signature is over the ``Sig_structure``
``["Signature1", protected, external_aad, payload]`` and is the raw ``r || s`` concatenation
(48 + 48 bytes for P-384), not DER.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
ES384 = -35
P384_COORDINATE_BYTES = 48


class CoseFormatError(ValueError):
    """The bytes are not a well-formed COSE_Sign1."""


def loads_strict(data: bytes) -> Any:
    """Decode exactly one CBOR item: duplicate map keys and trailing bytes are errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CoseFormatError(f"expected bytes, got {type(data).__name__}")
    stream = io.BytesIO(bytes(data))
    try:
        item = cbor2.CBORDecoder(stream, allow_duplicate_keys=False).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise CoseFormatError(f"not valid CBOR: {e}") from e
    if stream.tell() != len(data):
        raise CoseFormatError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    return item


@dataclass(frozen=True)
class Sign1:
    """A decoded COSE_Sign1 message (signature not yet checked)."""

    protected_bytes: bytes
    protected: dict
    unprotected: dict
    payload: bytes
    signature: bytes
    tagged: bool

    @property
    def algorithm(self) -> Any:
        return self.protected.get(HEADER_ALG)

    def to_be_signed(self, external_aad: bytes = b"") -> bytes:
        return sig_structure(self.protected_bytes, self.payload, external_aad)


def sig_structure(protected_bytes: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The bytes a COSE_Sign1 signature covers."""
    return cbor2.dumps(["Signature1", protected_bytes, external_aad, payload])


def decode_sign1(data: bytes) -> Sign1:
    """Parse a (tagged or untagged) COSE_Sign1 without verifying it."""
    item = loads_strict(data)
    tagged = False
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise CoseFormatError(f"CBOR tag {item.tag} is not COSE_Sign1 (18)")
        item, tagged = item.value, True
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        raise CoseFormatError("COSE_Sign1 must be an array of 4 items")
    protected_bytes, unprotected, payload, signature = item
    if not isinstance(protected_bytes, bytes):
        raise CoseFormatError("COSE_Sign1 protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise CoseFormatError("COSE_Sign1 unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise CoseFormatError("COSE_Sign1 payload must be a byte string (detached payloads are not used)")
    if not isinstance(signature, bytes):
        raise CoseFormatError("COSE_Sign1 signature must be a byte string")
    protected = loads_strict(protected_bytes) if protected_bytes else {}
    if not isinstance(protected, Mapping):
        raise CoseFormatError("COSE_Sign1 protected header must encode a map")
    return Sign1(protected_bytes, dict(protected), dict(unprotected), payload, signature, tagged)


def sign_es384(payload: bytes, key: ec.EllipticCurvePrivateKey, *, tagged: bool = True) -> bytes:
    """Make a COSE_Sign1 over ``payload`` with ES384, the way the Nitro Security Module does."""
    if not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("ES384 needs a P-384 key")
    protected_bytes = cbor2.dumps({HEADER_ALG: ES384})
    der = key.sign(sig_structure(protected_bytes, payload), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(P384_COORDINATE_BYTES, "big") + s.to_bytes(P384_COORDINATE_BYTES, "big")
    message = [protected_bytes, {}, payload, raw]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message) if tagged else message)


def verify_es384(message: Sign1, public_key: ec.EllipticCurvePublicKey) -> bool:
    """True when ``message.signature`` is a valid raw r||s ES384 signature by ``public_key``."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP384R1):
        return False
    if len(message.signature) != 2 * P384_COORDINATE_BYTES:
        return False
    r = int.from_bytes(message.signature[:P384_COORDINATE_BYTES], "big")
    s = int.from_bytes(message.signature[P384_COORDINATE_BYTES:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), message.to_be_signed(), ec.ECDSA(hashes.SHA384()))
    except _CryptoInvalidSignature:
        return False
    return True
