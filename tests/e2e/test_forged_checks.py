"""Through real Envoy with the shipped mTLS link: Envoy's Checks pass, a Check sent straight to
the ext_authz port with a forged jwt_authn payload is refused, spends nothing and audits nothing
in the victim's name (issue 9, finding 1)."""
from __future__ import annotations

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauthz.dev_certs import issue_client
from policy import Grant, Role
from policy.stores import open_store
from tests.extauthz.test_server import check_request
from tests.support.gateway_harness import ACCOUNTS, GatewayStack

pytestmark = [pytest.mark.envoy]

LIST = f"/{ACCOUNTS}/ListAccounts"


def test_forged_direct_checks_are_refused_while_envoys_pass(tmp_path):
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    with GatewayStack(tmp_path, store_url=store_url, grants=[Grant("erin", Role.ENGINEER)]) as gw:
        # Through Envoy (jwt_authn, then the mTLS Check): allowed.
        assert gw.call(LIST, as_="erin").code is grpc.StatusCode.OK
        target = f"127.0.0.1:{gw.extauthz.port}"
        forged = check_request(LIST, principal="erin")
        # Straight to the port, plaintext: no TLS handshake, no answer.
        with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as e:
            external_auth_pb2_grpc.AuthorizationStub(ch).Check(forged, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # TLS trusting the server, but no client certificate: the handshake fails.
        creds = grpc.ssl_channel_credentials(gw.tls_certs.ca.read_bytes())
        with grpc.secure_channel(target, creds) as ch, pytest.raises(grpc.RpcError) as e:
            external_auth_pb2_grpc.AuthorizationStub(ch).Check(forged, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # A certificate of the right CA that is not Envoy's: refused, with the reason.
        cert, key = issue_client(gw.tls_certs.directory, "batch-job.rpcauthz.internal", "batch-job")
        creds = grpc.ssl_channel_credentials(gw.tls_certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        with grpc.secure_channel(target, creds) as ch, pytest.raises(grpc.RpcError) as e:
            external_auth_pb2_grpc.AuthorizationStub(ch).Check(forged, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "batch-job.rpcauthz.internal" in e.value.details()
        # Envoy's own calls still pass after the attempts.
        assert gw.call(LIST, as_="erin").code is grpc.StatusCode.OK
        gw.extauthz.stop()
    store = open_store(store_url)
    try:
        checks = [a for a in store.list_audit() if a.actor == "erin"]
    finally:
        store.close()
    # Exactly the two calls through Envoy were decided and audited as erin; nothing forged was.
    assert len(checks) == 2, checks
