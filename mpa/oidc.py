"""OAuth 2.0 device authorization grant (RFC 8628) against an OIDC issuer, for ``mpa login``.

Discovery from ``{issuer}/.well-known/openid-configuration`` gives the device authorization
and token endpoints. The user opens the verification URI, enters the code, and we poll the
token endpoint (honouring ``interval`` and ``slow_down``) until it answers with tokens, the
user refuses, or the code expires. The ID token is what the gateway and the approvals API
verify, so that is what we keep (the access token if the issuer sends no ID token).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import httpx

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class DeviceFlowError(Exception):
    """Sign-in did not complete; the message says why."""


def device_flow_login(issuer: str, client_id: str, scope: str = "openid email profile", *,
                      show: Callable[[str], None] = print, timeout: float = 600,
                      sleep: Callable[[float], None] = time.sleep) -> str:
    """Run the device flow and return the token to present as ``Bearer``."""
    base = issuer.rstrip("/")
    try:
        disco = httpx.get(f"{base}/.well-known/openid-configuration", timeout=10)
        disco.raise_for_status()
        meta = disco.json()
    except (httpx.HTTPError, ValueError) as e:
        raise DeviceFlowError(f"cannot read {base}/.well-known/openid-configuration: {e}") from None
    device_ep, token_ep = meta.get("device_authorization_endpoint"), meta.get("token_endpoint")
    if not device_ep or not token_ep:
        raise DeviceFlowError(f"{issuer} does not offer the device flow "
                              "(no device_authorization_endpoint in its discovery document)")
    try:
        resp = httpx.post(device_ep, data={"client_id": client_id, "scope": scope}, timeout=10)
        start = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise DeviceFlowError(f"device authorization failed: {e}") from None
    if resp.status_code != 200 or "device_code" not in start:
        raise DeviceFlowError(f"device authorization refused: {start.get('error_description') or start.get('error') or resp.status_code}")
    uri = start.get("verification_uri_complete") or start.get("verification_uri")
    show(f"Open {uri} and enter the code {start.get('user_code')} to sign in.")
    interval = float(start.get("interval", 5))
    deadline = time.monotonic() + min(float(start.get("expires_in", timeout)), timeout)
    while time.monotonic() < deadline:
        sleep(interval)
        try:
            tok = httpx.post(token_ep, timeout=10, data={
                "grant_type": DEVICE_GRANT, "device_code": start["device_code"], "client_id": client_id})
            body = tok.json()
        except (httpx.HTTPError, ValueError) as e:
            raise DeviceFlowError(f"token endpoint failed: {e}") from None
        if tok.status_code == 200:
            token = body.get("id_token") or body.get("access_token")
            if not token:
                raise DeviceFlowError("the issuer answered without a token")
            return token
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise DeviceFlowError("sign-in was refused at the issuer")
        if error == "expired_token":
            break
        raise DeviceFlowError(f"sign-in failed: {body.get('error_description') or error or tok.status_code}")
    raise DeviceFlowError("the sign-in code expired before it was used; run mpa login again")
