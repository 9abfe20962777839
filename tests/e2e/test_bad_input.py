"""Bad input and broken dependencies through real Envoy: each a clear error, never an allow."""
from __future__ import annotations

import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2

from devstack.devissuer import DevIssuer
from tests.e2e.conftest import DOWN, ENGINEER, MALFORMED, SLOW
from tests.support.gateway_harness import ACCOUNTS

pytestmark = [pytest.mark.envoy]

LIST = f"/{ACCOUNTS}/ListAccounts"


def raw_call(gateway: str, path: str, token: str | None, timeout: float = 10.0):
    """A unary call with an arbitrary :path (the generated stubs cannot send bad ones)."""
    md = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(gateway) as ch:
        try:
            ch.unary_unary(path)(b"", timeout=timeout, metadata=md)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""


# --- identity --------------------------------------------------------------------------------------

def test_missing_token_is_unauthenticated(sqlite_gateway):
    r = sqlite_gateway.call(LIST)
    assert r.code is grpc.StatusCode.UNAUTHENTICATED and "Jwt is missing" in r.message


def test_forged_token_is_unauthenticated(sqlite_gateway):
    forger = DevIssuer()  # same issuer name and audience, different key
    r = sqlite_gateway.call(LIST, token=forger.mint(ENGINEER))
    assert r.code is grpc.StatusCode.UNAUTHENTICATED, r.render()


def test_expired_token_is_unauthenticated(sqlite_gateway):
    old = sqlite_gateway.issuer.mint(ENGINEER, now=time.time() - 7200, ttl_seconds=600)
    r = sqlite_gateway.call(LIST, token=old)
    assert r.code is grpc.StatusCode.UNAUTHENTICATED and "expired" in r.message.lower()


def test_wrong_audience_is_refused(sqlite_gateway):
    # jwt_authn answers a token for another audience with 403 (PERMISSION_DENIED).
    r = sqlite_gateway.call(LIST, token=sqlite_gateway.issuer.mint(ENGINEER, aud="someone-else"))
    assert r.code is grpc.StatusCode.PERMISSION_DENIED and "Audiences" in r.message, r.render()


def test_garbage_token_is_unauthenticated(sqlite_gateway):
    r = sqlite_gateway.call(LIST, token="not.a.jwt")
    assert r.code is grpc.StatusCode.UNAUTHENTICATED


# --- :path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,why", [
    (f"/{ACCOUNTS}/ListAccounts/extra", "3 segments"),
    (f"/{ACCOUNTS}/List%41ccounts", "percent-encoded"),
    (f"/{ACCOUNTS}%2FListAccounts", "percent-encoded"),
    (f"/{ACCOUNTS}/ListAccounts?admin=1", "query"),
    (f"/{ACCOUNTS}/", "no valid method"),
    (f"/{ACCOUNTS}/List-Accounts", "no valid method"),
    ("/" + "a." * 400 + "S/M", "over the limit"),
])
def test_bad_paths_through_envoy(sqlite_gateway, path, why):
    code, message = raw_call(sqlite_gateway.gateway, path, sqlite_gateway.token(ENGINEER))
    assert code is grpc.StatusCode.PERMISSION_DENIED, (code, message)
    assert "target.bad_path" in message and why in message


def test_unknown_service(sqlite_gateway):
    code, message = raw_call(sqlite_gateway.gateway, "/no.such.v1.Service/Do", sqlite_gateway.token(ENGINEER))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "target.unknown_service" in message


def test_unknown_method(sqlite_gateway):
    r = sqlite_gateway.call(LIST, as_=ENGINEER)  # warm the cache for Accounts
    assert r.code is grpc.StatusCode.OK
    code, message = raw_call(sqlite_gateway.gateway, f"/{ACCOUNTS}/DropTables", sqlite_gateway.token(ENGINEER))
    assert code is grpc.StatusCode.PERMISSION_DENIED and "target.unknown_method" in message


def _check(extauthz, path: str, principal: str | None) -> external_auth_pb2.CheckResponse:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.path = path
    req.attributes.request.http.method = "POST"
    if principal:
        s = struct_pb2.Struct()
        s.update({"jwt_payload": {"sub": principal}})
        req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(s)
    with extauthz.channel() as ch:  # Envoy's client certificate: only the request is odd
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


@pytest.mark.parametrize("path,principal,rule", [
    (LIST, None, "identity.unverified"),
    ("", ENGINEER, "target.bad_path"),
    (f"/{ACCOUNTS}/ListAccounts/x", ENGINEER, "target.bad_path"),
    (f"/{ACCOUNTS}/List%41ccounts", ENGINEER, "target.bad_path"),
    ("/" + "x" * 5000, ENGINEER, "target.bad_path"),
    ("/no.such.v1.Service/Do", ENGINEER, "target.unknown_service"),
])
def test_bad_requests_straight_to_the_check_api(sqlite_gateway, path, principal, rule):
    resp = _check(sqlite_gateway.extauthz, path, principal)
    assert resp.WhichOneof("http_response") == "denied_response"
    assert resp.denied_response.status.code == 403 and resp.status.code == 7
    assert rule in resp.denied_response.body


# --- reflection trouble: 503 / UNAVAILABLE, with the reason ------------------------------------------

@pytest.mark.parametrize("service,rule", [
    (DOWN, "reflection.reflection_unavailable"),
    (SLOW, "reflection.reflection_unavailable"),
    (MALFORMED, "reflection.malformed_descriptors"),
])
def test_reflection_failures_are_unavailable(sqlite_gateway, service, rule):
    t0 = time.monotonic()
    code, message = raw_call(sqlite_gateway.gateway, f"/{service}/Do", sqlite_gateway.token(ENGINEER))
    assert code is grpc.StatusCode.UNAVAILABLE, (code, message)
    assert rule in message and ENGINEER in message
    assert time.monotonic() - t0 < 5  # answered by us, well inside Envoy's ext_authz timeout


def test_ext_authz_server_down_is_unavailable_not_allow(tmp_path):
    """Envoy itself cannot reach the server: status_on_error 503 -> UNAVAILABLE."""
    from tests.e2e.conftest import cast_grants
    from tests.support.gateway_harness import GatewayStack

    with GatewayStack(tmp_path, store_url=f"sqlite:///{tmp_path / 's.db'}", grants=cast_grants()) as gw:
        assert gw.call(LIST, as_=ENGINEER).code is grpc.StatusCode.OK
        gw.extauthz.stop()
        r = gw.call(LIST, as_=ENGINEER)
        assert r.code is grpc.StatusCode.UNAVAILABLE, r.render()


def test_body_over_the_buffer_limit_is_refused_not_authorized_on_a_prefix(sqlite_gateway):
    # with_request_body.max_request_bytes is 64 KiB. Envoy hands us a 64 KiB prefix of a
    # somewhat larger body (allow_partial_message notwithstanding): we refuse it by name.
    r = sqlite_gateway.call(LIST, as_=ENGINEER, data={"accountId": "A-1", "note": "x" * 70_000})
    assert r.code is grpc.StatusCode.PERMISSION_DENIED, r.code
    assert "request.body_too_large" in r.message
    # Much larger bodies Envoy refuses itself (413).
    huge = sqlite_gateway.call(LIST, as_=ENGINEER, data={"accountId": "A-1", "note": "x" * 300_000})
    assert huge.code is not grpc.StatusCode.OK, huge.code
    small = sqlite_gateway.call(LIST, as_=ENGINEER, data={"accountId": "A-1", "note": "x" * 1000})
    assert small.code is grpc.StatusCode.OK, small.code
