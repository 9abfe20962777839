"""A development JWT issuer: an ES256 key, tokens for any engineer, and its JWKS.

For the demo and tests only. It stands where a real OIDC provider stands in production:
Envoy's jwt_authn and the approvals API verify its tokens against its JWKS exactly as
they would a real issuer's. Every token it mints carries ``"dev": true`` so logs show it.
"""
from __future__ import annotations

import json
import pathlib
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policy.jwk import b64url_uint, thumbprint

DEV_ISSUER = "https://dev-issuer.rpcauthz.invalid"
DEV_AUDIENCE = "rpcauthz"


class DevIssuer:
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
        self._jwk = {"kty": "EC", "crv": "P-256", "x": b64url_uint(numbers.x, 32), "y": b64url_uint(numbers.y, 32),
                     "use": "sig", "alg": "ES256"}
        self.kid = thumbprint({k: self._jwk[k] for k in ("crv", "kty", "x", "y")})
        self._jwk["kid"] = self.kid

    def mint(self, subject: str, *, ttl_seconds: int = 3600, name: str | None = None,
             now: float | None = None, **claims: object) -> str:
        """A signed token for ``subject`` (the principal id, e.g. an email address)."""
        iat = int(now if now is not None else time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "sub": subject, "email": subject,
                   "iat": iat, "nbf": iat, "exp": iat + ttl_seconds, "dev": True}
        if name:
            payload["name"] = name
        payload.update(claims)
        return jwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})

    def jwks(self) -> dict:
        """The public key set, as served at ``/.well-known/jwks.json``."""
        return {"keys": [dict(self._jwk)]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks())

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> JwksServer:
        """Serve the JWKS and an OIDC discovery document over HTTP in a background thread."""
        return JwksServer(self, host, port)


class JwksServer:
    """``/.well-known/jwks.json`` and ``/.well-known/openid-configuration`` on a local port.

    It also plays a minimal OAuth 2.0 device flow (RFC 8628) for ``mpa login --issuer``:
    ``POST /device/code`` starts one, ``GET /device?user_code=..&subject=..`` is the dev
    "user signs in and enters the code" step, and ``POST /token`` answers the polling client
    with ``authorization_pending`` until then, then with an ID token for that subject.
    """

    def __init__(self, issuer: DevIssuer, host: str, port: int) -> None:
        jwks = issuer.jwks_json().encode()
        pending: dict[str, dict[str, object]] = {}  # device_code -> {"user_code", "subject"}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                base = f"http://{self.headers.get('Host', '')}"
                path, _, query = self.path.partition("?")
                if path == "/.well-known/jwks.json":
                    body = jwks
                elif path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": issuer.issuer,
                                       "jwks_uri": f"{base}/.well-known/jwks.json",
                                       "device_authorization_endpoint": f"{base}/device/code",
                                       "token_endpoint": f"{base}/token"}).encode()
                elif path == "/device":
                    args = dict(urllib.parse.parse_qsl(query))
                    with lock:
                        hit = [d for d in pending.values() if d["user_code"] == args.get("user_code")]
                        if not hit or not args.get("subject"):
                            self._send(400, b"unknown user_code or no subject", "text/plain")
                            return
                        hit[0]["subject"] = args["subject"]
                    self._send(200, b"signed in; return to your terminal", "text/plain")
                    return
                else:
                    self.send_error(404, "not found")
                    return
                self._send(200, body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                base = f"http://{self.headers.get('Host', '')}"
                if self.path == "/device/code":
                    device_code, user_code = secrets.token_urlsafe(24), secrets.token_hex(4).upper()
                    with lock:
                        pending[device_code] = {"user_code": user_code, "subject": None}
                    body = {"device_code": device_code, "user_code": user_code,
                            "verification_uri": f"{base}/device",
                            "verification_uri_complete": f"{base}/device?user_code={user_code}",
                            "expires_in": 300, "interval": 1}
                    self._send(200, json.dumps(body).encode())
                elif self.path == "/token":
                    if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:device_code":
                        self._send(400, b'{"error": "unsupported_grant_type"}')
                        return
                    with lock:
                        entry = pending.get(form.get("device_code", ""))
                        if entry is None:
                            self._send(400, b'{"error": "expired_token"}')
                            return
                        subject = entry["subject"]
                        if subject is None:
                            self._send(400, b'{"error": "authorization_pending"}')
                            return
                        del pending[form["device_code"]]
                    token = issuer.mint(str(subject))
                    self._send(200, json.dumps({"id_token": token, "access_token": token,
                                                "token_type": "Bearer"}).encode())
                else:
                    self.send_error(404, "not found")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="dev-jwks")
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
