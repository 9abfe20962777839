"""A development JWT issuer that serves its JWKS: for the demo, tests and benchmarks only.

The key, ``mint`` and ``jwks`` are :class:`mpa.dev_tokens.DevTokens` (the approvals server's
dev sign-in uses those directly); this adds an HTTP server for the JWKS, OIDC discovery and a
dev device flow. ``JwksServer.url`` is the JWKS URL; whatever starts one prints it.
"""
from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mpa.dev_tokens import DEV_AUDIENCE, DEV_ISSUER, DevTokens

__all__ = ["DEV_AUDIENCE", "DEV_ISSUER", "DevIssuer", "JwksServer"]


class DevIssuer(DevTokens):
    """:class:`mpa.dev_tokens.DevTokens` that can also serve its JWKS (and a dev device flow)."""

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
