"""The Envoy-to-ext_authz trust boundary: who may send Checks (extauthz/listeners.py).

A Check names its caller in metadata, so a forged Check must never reach a decision: without a
client certificate the TLS handshake fails, with a certificate of the right CA but the wrong
name the Check is refused UNAUTHENTICATED (nothing spent, nothing audited as the victim), and a
non-loopback plaintext listener needs the explicit opt-out.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import free_port
from extauthz.config import ConfigError, load_settings
from extauthz.dev_certs import CLIENT_NAME, make_dev_certs
from extauthz.dev_certs import issue_client as issue_client_cert
from extauthz.server import AUTHZ_SERVICE, Components, serve
from policy import Grant, GrantSet, Mode, Role
from policy.stores import open_store
from reflection_cache.types import ServiceModes
from tests.extauthz.test_server import check_request
from tests.support.extauthz_doubles import FixedGrants, StaticModes
from tests.support.gateway_harness import ACCOUNTS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    c = make_dev_certs(d)
    issue_client_cert(d, "intruder.rpcauthz.internal", "intruder")
    other = make_dev_certs(tmp_path_factory.mktemp("other-pki"))
    return c, other


@contextlib.asynccontextmanager
async def running(settings):
    modes = StaticModes({ACCOUNTS: ServiceModes(ACCOUNTS, {"ListAccounts": Mode.ENGINEERS_WITHOUT_APPROVAL})})
    store = open_store("sqlite:///:memory:")
    comps = Components(store, FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)])), modes)
    stop = asyncio.Event()
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, components=comps, stop=stop, install_signal_handlers=False,
                                     on_ready=ready.set_result))
    try:
        # Ready, or the server's start failed (then its error surfaces now, not after 10 s).
        done, _ = await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            if task in done:
                task.result()
                raise RuntimeError("serve() returned before it was ready")
            raise TimeoutError("the server was not ready within 10 s")
        yield store
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def _creds(ca, cert=None, key=None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                        cert.read_bytes() if cert else None)


async def _check(channel: grpc.aio.Channel, principal: str = "alice"):
    return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(principal=principal), timeout=5)


async def test_mtls_listener_answers_envoy_and_refuses_everyone_else(certs, caplog):
    c, other = certs
    port = free_port()
    settings = load_settings(env={}, overrides={"store_url": "memory:", "drain_notice_s": 0, "listen.port": port, "metrics.port": None,
                                                "listen.tls": c.server_settings()})
    target = f"127.0.0.1:{port}"
    async with running(settings) as store:
        # Envoy's certificate: an ordinary decision.
        async with grpc.aio.secure_channel(target, _creds(c.ca, c.client_cert, c.client_key)) as ch:
            resp = await _check(ch)
            assert resp.status.code == 0
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE))
            assert h.status == health_pb2.HealthCheckResponse.SERVING
        # Plaintext: no handshake, no answer.
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _check(ch, "erin")
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # TLS without a client certificate: the handshake fails.
        async with grpc.aio.secure_channel(target, _creds(c.ca)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _check(ch, "erin")
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # A client certificate of another CA: the handshake fails.
        async with grpc.aio.secure_channel(target, _creds(c.ca, other.client_cert, other.client_key)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _check(ch, "erin")
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # The right CA, the wrong name: refused with a reason, before any decision.
        d = c.directory
        caplog.set_level(logging.WARNING, logger="extauthz")
        async with grpc.aio.secure_channel(target, _creds(c.ca, d / "intruder.crt", d / "intruder.key")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _check(ch, "erin")
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "intruder.rpcauthz.internal" in e.value.details()
            assert "client_names" in e.value.details()
        assert "refused a Check" in caplog.text
        await asyncio.sleep(0.3)  # the audit writer's batch window
        actors = {a.actor for a in store.list_audit()}
        assert "alice" in actors and "erin" not in actors


async def test_unix_socket_listener_is_group_only_and_answers(tmp_path):
    sock = tmp_path / "extauthz.sock"
    settings = load_settings(env={}, overrides={"store_url": "memory:", "drain_notice_s": 0, "listen.port": None, "metrics.port": None,
                                                "listen.unix_socket": str(sock)})
    async with running(settings):
        mode = stat.S_IMODE(os.stat(sock).st_mode)
        assert mode == 0o660, oct(mode)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            assert (await _check(ch)).status.code == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "extauthz.example"])
def test_plaintext_on_a_reachable_address_needs_the_explicit_opt_out(host):
    with pytest.raises(ConfigError) as e:
        load_settings(env={}, overrides={"store_url": "memory:", "listen.host": host})
    assert "listen.tls" in str(e.value) and "allow_plaintext" in str(e.value)
    s = load_settings(env={}, overrides={"store_url": "memory:", "listen.host": host, "listen.allow_plaintext": True})
    assert s.listen.allow_plaintext


async def test_plaintext_opt_out_is_logged_loudly(caplog):
    port = free_port()
    settings = load_settings(env={}, overrides={"store_url": "memory:", "drain_notice_s": 0, "listen.host": "0.0.0.0", "listen.port": port,
                                                "metrics.port": None, "listen.allow_plaintext": True})
    caplog.set_level(logging.INFO, logger="extauthz")
    async with running(settings):
        pass
    assert any(r.levelno == logging.CRITICAL and "INSECURE" in r.getMessage() for r in caplog.records)


def test_tls_settings_are_checked(certs):
    c, _ = certs
    tls = c.server_settings()
    with pytest.raises(ConfigError, match="listen.tls.client_names"):
        load_settings(env={}, overrides={"store_url": "memory:", "listen.tls": {**tls, "client_names": []}})
    with pytest.raises(ConfigError, match="listen.tls.client_ca"):
        load_settings(env={}, overrides={"store_url": "memory:", "listen.tls": {k: v for k, v in tls.items() if k != "client_ca"}})
    assert load_settings(env={}, overrides={"store_url": "memory:", "listen.tls": tls}).listen.tls.client_names == [CLIENT_NAME]


async def test_unreadable_certificate_is_a_clear_start_error(certs, tmp_path):
    c, _ = certs
    settings = load_settings(env={}, overrides={"store_url": "memory:", "drain_notice_s": 0, "listen.port": free_port(), "metrics.port": None,
                                                "listen.tls": {**c.server_settings(), "key": str(tmp_path / "nope.key")}})
    with pytest.raises(OSError, match=r"listen.tls.key .*nope.key"):
        async with running(settings):
            pass
