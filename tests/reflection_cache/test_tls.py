"""Reflection over TLS and mutual TLS, against a real TLS gRPC server."""
from __future__ import annotations

import pytest

from reflection_cache import ReflectionUnavailable
from reflection_cache.cache import ReflectionCache
from reflection_cache.client import tls_credentials
from tests.support.reflection_tls import ORDERS


async def fetch(config, service=ORDERS):
    cache = ReflectionCache.from_config(config)
    try:
        return await cache.get(service)
    finally:
        await cache.close()


async def test_mutual_tls_with_a_configured_ca_and_client_certificate(reflection_pki, mtls_reflection_server):
    modes = await fetch({"endpoints": {"default": mtls_reflection_server.address},
                         "tls": {"ca_file": str(reflection_pki.ca), "cert_file": str(reflection_pki.client_cert),
                                 "key_file": str(reflection_pki.client_key)}})
    assert modes.service == ORDERS and mtls_reflection_server.streams == 1


@pytest.mark.parametrize("tls", [None, "no-client-cert"], ids=["plaintext", "tls-without-client-cert"])
async def test_without_the_right_credentials_reflection_is_unavailable(reflection_pki, mtls_reflection_server, tls):
    config = {"endpoints": {"default": mtls_reflection_server.address}, "cache": {"deadline": 2}}
    if tls:
        config["tls"] = {"ca_file": str(reflection_pki.ca)}
    with pytest.raises(ReflectionUnavailable, match=mtls_reflection_server.address):
        await fetch(config)
    assert mtls_reflection_server.servicer.symbol_questions[ORDERS] == 0


def test_bad_tls_configuration_is_refused_by_name(reflection_pki, tmp_path):
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        tls_credentials(ca_file=str(reflection_pki.ca), cert_file=str(reflection_pki.client_cert))
    with pytest.raises(ValueError, match=f"cannot read ca_file {tmp_path}/missing.pem"):
        tls_credentials(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="tls.ca: unknown key"):
        ReflectionCache.from_config({"tls": {"ca": "x"}})
    with pytest.raises(ValueError, match=f"cannot read ca_file {tmp_path}/missing.pem"):
        ReflectionCache.from_config({"tls": {"ca_file": str(tmp_path / "missing.pem")}})
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        ReflectionCache.from_config({"tls": {"cert_file": str(reflection_pki.client_cert)}})
    with pytest.raises(ValueError, match="plaintext: true cannot go with ca_file"):
        ReflectionCache.from_config({"tls": {"plaintext": True, "ca_file": str(reflection_pki.ca)}})
    with pytest.raises(ValueError, match="shop.internal:50051 is not on this machine: configure reflection.tls"):
        ReflectionCache.from_config({"endpoints": {"default": "shop.internal:50051"}})
    ReflectionCache.from_config({"endpoints": {"default": "shop.internal:50051"},
                                 "tls": {"plaintext": True}})


def test_reflect_command_over_mutual_tls(reflection_pki, mtls_reflection_server):
    import pathlib
    import subprocess
    import sys
    out = subprocess.run(
        [sys.executable, "-m", "reflection_cache.cli", ORDERS, "--endpoint", mtls_reflection_server.address,
         "--ca-file", str(reflection_pki.ca), "--cert-file", str(reflection_pki.client_cert), "--key-file", str(reflection_pki.client_key)],
        cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "GetOrder" in out.stdout and "ENGINEERS_WITHOUT_APPROVAL" in out.stdout


async def test_tls_for_one_endpoint_with_a_server_name_override(reflection_pki, mtls_reflection_server):
    """Per-endpoint TLS beside plaintext elsewhere; the certificate is checked against
    ``server_name``, not the address dialled."""
    tls = {"ca_file": str(reflection_pki.ca), "cert_file": str(reflection_pki.client_cert), "key_file": str(reflection_pki.client_key)}
    modes = await fetch({"endpoints": {"default": mtls_reflection_server.address},
                         "tls_by_endpoint": {mtls_reflection_server.address: {**tls, "server_name": "localhost"}}})
    assert modes.service == ORDERS
    with pytest.raises(ReflectionUnavailable, match=mtls_reflection_server.address):
        await fetch({"endpoints": {"default": mtls_reflection_server.address}, "cache": {"deadline": 2},
                     "tls_by_endpoint": {mtls_reflection_server.address: {**tls, "server_name": "orders.example"}}})
