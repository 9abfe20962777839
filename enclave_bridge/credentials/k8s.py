"""Kubernetes credentials: OIDC ID tokens signed with the broker's seed key.

The cluster's API server trusts the broker as an OIDC issuer (``--oidc-issuer-url``, or a
structured ``AuthenticationConfiguration``) and fetches its discovery document and JWKS,
which :class:`OidcServer` serves. Tokens are RS256, short-lived, and carry the engineer as
``sub``, the approved groups as ``groups``, and the request id as ``mpa_request``.
"""
from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from policy.jwk import b64url_uint, thumbprint

MAX_TOKEN_SECONDS = 3600
JWKS_PATH = "/openid/v1/jwks"
DISCOVERY_PATH = "/.well-known/openid-configuration"


class OidcIssuer:
    """Signs ID tokens for Kubernetes and publishes the matching discovery document and JWKS."""

    def __init__(self, issuer: str, signing_key: rsa.RSAPrivateKey) -> None:
        if not isinstance(signing_key, rsa.RSAPrivateKey) or signing_key.key_size < 2048:
            raise ValueError("the Kubernetes signing key must be RSA with at least 2048 bits")
        if not issuer or issuer.endswith("/"):
            raise ValueError(f"issuer must be a URL without a trailing slash, got {issuer!r}")
        self.issuer = issuer
        self._key = signing_key
        numbers = signing_key.public_key().public_numbers()
        jwk = {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)}
        # RFC 7638 thumbprint as kid, so a rotated key gets a new kid.
        self.kid = thumbprint(jwk)
        self._jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def mint(self, *, subject: str, audience: str, groups: Sequence[str], ttl_seconds: int,
             request_id: str, now: datetime) -> tuple[str, datetime]:
        """A signed token and its expiry. ``ttl_seconds`` is clamped to 1..MAX_TOKEN_SECONDS."""
        ttl = max(1, min(int(ttl_seconds), MAX_TOKEN_SECONDS))
        iat = int(now.timestamp())
        exp = iat + ttl
        claims = {"iss": self.issuer, "aud": audience, "sub": subject, "groups": list(groups),
                  "iat": iat, "nbf": iat, "exp": exp, "jti": uuid.uuid4().hex, "mpa_request": request_id}
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
        return token, datetime.fromtimestamp(exp, UTC)

    def jwks(self) -> dict:
        return {"keys": [dict(self._jwk)]}

    def discovery(self) -> dict:
        """The OpenID discovery document the API server reads."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}{JWKS_PATH}",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["sub", "groups", "iss", "aud", "exp", "iat"],
        }

    def serve(self, host: str, port: int) -> OidcServer:
        return OidcServer(self, host, port)


class OidcServer:
    """Serves the discovery document and JWKS over HTTP on ``host:port`` in a thread.

    In production this sits behind the egress/ingress Envoy with a public TLS name that equals
    the issuer URL; here it is the plain HTTP origin the issuer URL names.
    """

    def __init__(self, issuer: OidcIssuer, host: str, port: int) -> None:
        bodies = {DISCOVERY_PATH: json.dumps(issuer.discovery()).encode(),
                  JWKS_PATH: json.dumps(issuer.jwks()).encode()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = bodies.get(self.path.split("?", 1)[0])
                if body is None:
                    self.send_error(404, "not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="oidc")
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def token_ttl(requested: int | None, approval_remaining: float, cluster_max: int = MAX_TOKEN_SECONDS) -> int:
    """The shortest token lifetime that fits the ask, the approval's remaining time and the cap."""
    cap = max(1, min(cluster_max, MAX_TOKEN_SECONDS))
    want = cap if not requested else min(int(requested), cap)
    return max(1, min(want, int(approval_remaining)))
