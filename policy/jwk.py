"""JSON Web Key encoding (RFC 7515 base64url, RFC 7518 integers) and RFC 7638 thumbprints.

Pure functions, no I/O: shared by the dev issuer (mpa) and the Kubernetes OIDC issuer
(enclave_bridge), which may both depend on policy but not on each other.
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_uint(n: int, length: int | None = None) -> str:
    """A non-negative integer as big-endian base64url: in ``length`` bytes (EC coordinates are
    fixed-width), or in the fewest bytes when ``length`` is None (RSA ``n`` and ``e``)."""
    return b64url(n.to_bytes(length if length is not None else (n.bit_length() + 7) // 8, "big"))


def thumbprint(required_members: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint (SHA-256) of a JWK given only its required members
    (EC: crv, kty, x, y; RSA: e, kty, n)."""
    canonical = json.dumps(dict(required_members), separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())
