"""Who is calling: Bearer JWTs verified against the issuer's JWKS.

The same tokens Envoy's ``jwt_authn`` accepts: ``iss`` must be the configured issuer, ``aud``
one of the configured audiences, ``exp``/``nbf`` current, and the signature must verify with a
key from the JWKS (fetched with PyJWT's ``PyJWKClient``, cached). The principal is the
``principal_claim`` (``sub`` by default, as in the gateway's identity config).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

#: Algorithms we accept. Never "none", never HMAC (the JWKS is public).
ALGORITHMS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA")


class AuthError(Exception):
    """The caller is not authenticated; ``message`` says why (never echoes the token)."""

    code = "unauthenticated"


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated engineer."""

    id: str
    name: str | None = None
    dev: bool = False

    @property
    def display(self) -> str:
        return f"{self.name} <{self.id}>" if self.name and self.name != self.id else self.id


class TokenVerifier:
    """Verifies tokens from one issuer. Thread-safe; keys are cached by ``PyJWKClient``."""

    def __init__(self, issuer: str, jwks_url: str, audiences: Sequence[str],
                 leeway_seconds: int = 30, principal_claim: str = "sub",
                 jwks: Mapping[str, Any] | None = None) -> None:
        """``jwks`` (a key set in hand, e.g. the server's own dev tokens') replaces fetching
        ``jwks_url``."""
        if not issuer or not (jwks_url or jwks) or not audiences:
            raise ValueError("a token verifier needs an issuer, a JWKS URL and an audience")
        self.issuer = issuer
        self.audiences = list(audiences)
        self.leeway = leeway_seconds
        self.principal_claim = principal_claim
        self._jwks: jwt.PyJWKClient | _KeysInHand = (
            _KeysInHand(jwks) if jwks is not None
            else jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5))

    def verify(self, token: str) -> Principal:
        """The principal the token names; raises ``AuthError`` with a clear reason."""
        if not token or token.count(".") != 2:
            raise AuthError("the bearer token is not a JWT")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise AuthError("the issuer's signing keys could not be fetched; try again") from None
        except (jwt.PyJWKClientError, jwt.DecodeError) as e:
            raise AuthError(f"the token's signing key is not one of the issuer's: {e}") from None
        try:
            claims = jwt.decode(token, key.key, algorithms=list(ALGORITHMS),
                                audience=self.audiences, issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired; log in again (mpa login)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"the token is not for this service (audience must be one of "
                            f"{', '.join(self.audiences)})") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"the token was not issued by {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"the token is not valid: {e}") from None
        principal = claims.get(self.principal_claim)
        if not isinstance(principal, str) or not principal:
            raise AuthError(f"the token names no principal (no {self.principal_claim} claim)")
        name = claims.get("name") if isinstance(claims.get("name"), str) else None
        return Principal(principal, name, bool(claims.get("dev")))


class _KeysInHand:
    """The part of ``PyJWKClient`` the verifier uses, over a key set it already holds."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = jwt.PyJWKSet.from_dict(dict(jwks))

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK:
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._keys.keys:
            if key.key_id == kid:
                return key
        raise jwt.PyJWKClientError(f"no key with kid {kid!r}")
