"""Checks sent straight to the ext_authz port with a forged jwt_authn payload (not through
Envoy), next to Envoy's own: plaintext, TLS without a client certificate, and a certificate of
the right CA with another name. Goals: every forged Check refused; Envoy's calls pass; nothing
decided or audited in the victim's name but Envoy's calls.
"""
from __future__ import annotations

import pathlib

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauthz.dev_certs import issue_client
from policy import Grant, Role
from policy.stores import open_store
from tests.support.extauthz_doubles import check_request
from tests.support.faults.outcome import ScenarioResult
from tests.support.gateway_harness import ACCOUNTS, GatewayStack

LIST = f"/{ACCOUNTS}/ListAccounts"
VICTIM = "erin"


def forged_checks(workdir: pathlib.Path) -> ScenarioResult:
    r = ScenarioResult("direct Check with forged metadata")
    store_url = f"sqlite:///{workdir / 's.db'}"
    via_envoy: list[grpc.StatusCode] = []
    with GatewayStack(workdir, store_url=store_url, grants=[Grant(VICTIM, Role.ENGINEER)]) as gw:
        assert gw.extauthz is not None and gw.tls_certs is not None
        via_envoy.append(gw.call(LIST, as_=VICTIM).code)
        target = f"127.0.0.1:{gw.extauthz.port}"
        cert, key = issue_client(gw.tls_certs.directory, "batch-job.rpcauthz.internal", "batch-job")
        ca = gw.tls_certs.ca.read_bytes()
        attempts = {
            "plaintext": (None, grpc.StatusCode.UNAVAILABLE),
            "TLS, no client certificate": (grpc.ssl_channel_credentials(ca), grpc.StatusCode.UNAVAILABLE),
            "client certificate with another name": (
                grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes()),
                grpc.StatusCode.UNAUTHENTICATED),
        }
        for how, (creds, want) in attempts.items():
            code, details = _check(target, creds)
            r.calls += 1
            r.wrong_allows += code is grpc.StatusCode.OK
            r.unavailable += code is grpc.StatusCode.UNAVAILABLE
            r.detail.append(f"forged, {how}: {code.name} {details!r}"[:200])
            ok = code is want and (how != "client certificate with another name" or
                                   "batch-job.rpcauthz.internal" in details)
            r.goal(f"forged Check refused ({how})", ok, code.name)
        via_envoy.append(gw.call(LIST, as_=VICTIM).code)
        gw.extauthz.stop()
    r.calls += len(via_envoy)
    store = open_store(store_url)
    try:
        decided = [a for a in store.list_audit() if a.actor == VICTIM]
    finally:
        store.close()
    r.audit_expected, r.audit_written = len(via_envoy), len(decided)
    r.audit_duplicated = max(0, len(decided) - len(via_envoy))
    r.detail.append(f"through Envoy: {[c.name for c in via_envoy]}; audited as {VICTIM}: {len(decided)}")
    r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls - len(via_envoy)} forged")
    r.goal("Envoy's calls pass", all(c is grpc.StatusCode.OK for c in via_envoy))
    r.goal("only Envoy's calls decided and audited as the victim", len(decided) == len(via_envoy),
           f"{len(decided)} audited, {len(via_envoy)} through Envoy")
    return r


def _check(target: str, creds: grpc.ChannelCredentials | None) -> tuple[grpc.StatusCode, str]:
    forged = check_request(LIST, principal=VICTIM)
    channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
    with channel as ch:
        try:
            resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(forged, timeout=5)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    # An answer at all is a failure of the boundary; an allow (status 0) is the worst one.
    return (grpc.StatusCode.OK if resp.status.code == 0 else grpc.StatusCode.PERMISSION_DENIED), str(resp.status)
