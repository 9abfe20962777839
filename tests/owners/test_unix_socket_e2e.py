"""Sidecar deployment: ``mpactl envoy render`` points the ext_authz cluster at the server's unix
socket (``gateway.ext_authz.unix_socket``), the rendered config passes ``envoy --mode validate``,
and calls through the real Envoy are decided by a server listening on that socket.
"""
from __future__ import annotations

import shutil
import stat
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import yaml

from devstack import democlient
from devstack.devissuer import DevIssuer
from devstack.processes import EnvoyProcess, ExtAuthzProcess, free_port
from policy import Grant, Role
from tests.support.gateway_harness import ACCOUNTS, extauthz_config, seed_grants
from tests.support.owners_support import run_mpactl

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def test_envoy_reaches_ext_authz_over_a_unix_socket(tmp_path: Path):
    from devstack.demo_services import start_demo_server

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_grants(store_url, [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)])
    sock_dir = Path(tempfile.mkdtemp(prefix="rz-", dir="/tmp"))  # short: sun_path is 108 bytes
    sock = sock_dir / "extauthz.sock"
    issuer = DevIssuer()
    jwks = issuer.serve()
    started: list = []
    try:
        accounts = start_demo_server(services=("accounts",))
        started.append(accounts)
        # The server also listens on loopback TCP, only so the test can wait until it is ready;
        # the rendered Envoy knows nothing but the socket.
        cfg = extauthz_config(port=free_port(), store_url=store_url,
                              reflection_static={ACCOUNTS: accounts.address},
                              extra={"listen.unix_socket": str(sock)})
        ext = ExtAuthzProcess(cfg, tmp_path)
        started.append(ext)
        ext.wait_ready()
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        listen, admin = free_port(), free_port()
        catalog = tmp_path / "services.yaml"
        catalog.write_text(f"""\
gateway:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  ext_authz:
    unix_socket: {sock}
  jwt:
    issuer: {issuer.issuer}
    audiences: [{issuer.audience}]
    jwks_uri: {jwks.url}
services:
  - name: {ACCOUNTS}
    upstream: {accounts.address}
""")
        out = tmp_path / "gateway.yaml"
        res = run_mpactl("envoy", "render", "--catalog", str(catalog), "-o", str(out), "--validate")
        assert res.returncode == 0, res.stderr
        rendered = yaml.safe_load(out.read_text())
        (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == "ext_authz"]
        assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
            "pipe": {"path": str(sock)}}
        envoy = EnvoyProcess(rendered, tmp_path)
        started.append(envoy)
        envoy.wait_ready()
        deadline = time.monotonic() + 20
        while not envoy.cluster_healthy("ext_authz"):  # gRPC health checks over the socket
            assert time.monotonic() < deadline, "envoy never saw ext_authz healthy over the socket"
            time.sleep(0.1)

        def call(path: str, who: str):
            return democlient.call(f"127.0.0.1:{listen}", path, token=issuer.mint(who),
                                   data={"account_id": "a1"})
        assert call(f"/{ACCOUNTS}/ListAccounts", "bob").code is grpc.StatusCode.OK
        denied = call(f"/{ACCOUNTS}/UpdateLimits", "bob")  # CONTRIBUTORS_WITHOUT_APPROVAL
        assert denied.code is grpc.StatusCode.PERMISSION_DENIED and "contributor" in denied.message
        stats = envoy.stats("http.engineers_grpc.ext_authz.")
        assert int(stats["http.engineers_grpc.ext_authz.ok"]) >= 1
        assert int(stats["http.engineers_grpc.ext_authz.denied"]) >= 1
        # Without the server, the socket's calls fail closed (UNAVAILABLE), never allowed.
        ext.stop()
        started.remove(ext)
        assert call(f"/{ACCOUNTS}/ListAccounts", "bob").code is grpc.StatusCode.UNAVAILABLE
    finally:
        for proc in reversed(started):
            if isinstance(proc, (EnvoyProcess, ExtAuthzProcess)):
                proc.stop()
            else:
                proc.stop(grace=0)
        jwks.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
