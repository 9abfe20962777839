"""Dev-only token minting: an ES256 key, tokens for any engineer, and its public key set.

The approvals server's dev sign-in (``dev_login`` in its configuration) mints with this;
``devstack.devissuer.DevIssuer`` builds on it and also serves the key set over HTTP. It stands
where a real OIDC provider stands in production: Envoy's jwt_authn and the approvals API
verify its tokens against its JWKS exactly as they would a real issuer's. Every token it mints
carries ``"dev": true`` so logs show it. Never for production.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policy.jwk import b64url_uint, thumbprint

DEV_ISSUER = "https://dev-issuer.rpcauthz.invalid"
DEV_AUDIENCE = "rpcauthz"
#: Where a server that holds dev tokens serves their key set (relative to its base URL).
JWKS_PATH = "/.well-known/jwks.json"


class DevTokens:
    """Mints ES256 JWTs; keeps its private key in ``key_path`` (created 0600 if missing)."""

    def __init__(self, key_path: pathlib.Path | None = None, issuer: str = DEV_ISSUER,
                 audience: str = DEV_AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        if key_path is not None and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} does not hold an EC private key")
            self._key = key
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            if key_path is not None:
                key_path.parent.mkdir(parents=True, exist_ok=True)
                key_path.touch(mode=0o600)
                key_path.write_bytes(self._key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()))
        numbers = self._key.public_key().public_numbers()
        self._jwk = {"kty": "EC", "crv": "P-256", "x": b64url_uint(numbers.x, 32),
                     "y": b64url_uint(numbers.y, 32), "use": "sig", "alg": "ES256"}
        self.kid = thumbprint({k: self._jwk[k] for k in ("crv", "kty", "x", "y")})
        self._jwk["kid"] = self.kid

    def mint(self, subject: str, *, ttl_seconds: int = 3600, name: str | None = None,
             now: float | None = None, **claims: object) -> str:
        """A signed token for ``subject`` (the principal id, e.g. an email address)."""
        iat = int(now if now is not None else time.time())
        payload: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject,
                                   "email": subject, "iat": iat, "nbf": iat,
                                   "exp": iat + ttl_seconds, "dev": True}
        if name:
            payload["name"] = name
        payload.update(claims)
        return jwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at ``/.well-known/jwks.json``."""
        return {"keys": [dict(self._jwk)]}

    def jwks_json(self) -> str:
        """:meth:`jwks` as JSON text."""
        return json.dumps(self.jwks())
