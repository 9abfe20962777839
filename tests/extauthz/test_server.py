"""The server process: health, graceful drain, metrics, workers, start-up errors."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import REPO_ROOT, ExtAuthzProcess, free_port, wait_serving
from extauthz.config import load_settings
from extauthz.server import AUTHZ_SERVICE, Components, serve
from policy import Grant, GrantSet, Mode, Role
from policy.stores import open_store
from reflection_cache.types import ServiceModes
from tests.support.extauthz_doubles import FixedGrants, StaticModes, check_request
from tests.support.gateway_harness import ACCOUNTS, metrics_text, seed_grants

PATH = f"/{ACCOUNTS}/ListAccounts"
#: Subprocess environment with /metrics off, so the default metrics port is never contended.
def no_metrics() -> dict[str, str]:
    """This test's environment (read now: its state dir is per test) without the metrics listener."""
    return {**os.environ, "RPCAUTHZ_METRICS__PORT": "null"}


async def test_drain_finishes_in_flight_checks_and_reports_not_serving():
    port = free_port()
    settings = load_settings(env={}, overrides={"store_url": "memory:", "listen.port": port,
                                                "metrics.port": None, "drain_grace_s": 5,
                                                "drain_notice_s": 0.5})
    modes = StaticModes({ACCOUNTS: ServiceModes(ACCOUNTS, {"ListAccounts": Mode.ENGINEERS_WITHOUT_APPROVAL})})
    modes.delay = 0.6  # every check takes a while
    comps = Components(open_store("sqlite:///:memory:"), FixedGrants(GrantSet([Grant("alice", Role.ENGINEER)])), modes)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, components=comps, stop=stop, install_signal_handlers=False))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(100):
            try:
                r = await health.Check(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=10))
        await asyncio.sleep(0.2)
        stop.set()
        # Health watchers hear NOT_SERVING as the drain starts...
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ...checks still get answers during the notice period...
        modes.delay = 0
        during = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=5)
        assert during.status.code == 0
        # ...and the check already running still gets its real answer.
        resp = await in_flight
        assert resp.status.code == 0 and resp.ok_response.headers
    await asyncio.wait_for(server, 10)
    # After the drain nothing listens any more.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=2)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def demo_upstream():
    from devstack.demo_services import start_demo_server
    s = start_demo_server(services=("accounts",))
    yield s
    s.stop(grace=0)


def _config(tmp_path, upstream, **extra):
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_grants(store_url, [Grant("alice", Role.ENGINEER)])
    cfg = {"store_url": store_url, "listen": {"host": "127.0.0.1", "port": free_port()}, "drain_notice_s": 0,
           "metrics": {"host": "127.0.0.1", "port": free_port()},
           "reflection": {"endpoints": {"static": {ACCOUNTS: upstream.address}}}}
    cfg.update(extra)
    return cfg


def _metrics(port: int) -> str:
    return metrics_text(f"http://127.0.0.1:{port}/metrics")


def test_sigterm_drains_and_metrics_count_decisions(tmp_path, demo_upstream):
    cfg = _config(tmp_path, demo_upstream)
    proc = ExtAuthzProcess(cfg, tmp_path).wait_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            assert stub.Check(check_request(), timeout=5).status.code == 0
            assert stub.Check(check_request(principal="mallory"), timeout=5).status.code == 7
            assert stub.Check(check_request("/rpcauthz.broken.v1.X/Y"), timeout=5).status.code == 7
        text = _metrics(cfg["metrics"]["port"])
        assert re.search(r'rpcauthz_decisions_total\{mode="ENGINEERS_WITHOUT_APPROVAL",outcome="allow",'
                         r'rule="engineers_without_approval.engineer"\} 1\.0', text), text
        assert 'rule="principal.not_engineer"' in text
        assert 'rule="target.unknown_service"' in text
        assert "rpcauthz_decision_seconds_bucket" in text
        assert 'rpcauthz_reflection_cache_stat{stat="fetches"}' in text
        assert 'rpcauthz_grant_cache_stat{stat="revision"}' in text
        # the server process froze its start-up heap out of the collector's way (extauthz/heap.py)
        frozen = re.search(r'rpcauthz_gc_stat\{stat="frozen_objects"\} (\S+)', text)
        assert frozen and float(frozen.group(1)) > 10_000, text
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0
        assert "extauthz: stopped" in proc.output()
    finally:
        proc.stop()


def test_workers_share_the_port(tmp_path, demo_upstream):
    cfg = _config(tmp_path, demo_upstream, workers=2)
    proc = ExtAuthzProcess(cfg, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(set(re.findall(r"serving on 127\.0\.0\.1:\d+ \(pid (\d+)", proc.output()))) < 2:
            proc.check_alive()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.2)
        pids = set(re.findall(r"serving on 127\.0\.0\.1:\d+ \(pid (\d+)", proc.output()))
        assert len(pids) == 2 and str(proc.pid) not in pids
        wait_serving(f"127.0.0.1:{proc.port}", 30, AUTHZ_SERVICE)
        for _ in range(12):  # fresh connections: the kernel spreads them over both workers
            with grpc.insecure_channel(f"127.0.0.1:{proc.port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=10)
                assert resp.status.code == 0
        text = _metrics(cfg["metrics"]["port"])
        total = sum(float(v) for v in re.findall(r'rpcauthz_decisions_total\{[^}]*outcome="allow"[^}]*\} ([0-9.]+)', text))
        assert total == 12, text
        # Each worker's components' stats reach the supervisor's /metrics, one series per worker.
        deadline = time.monotonic() + 30
        while True:
            stats = _worker_stats(_metrics(cfg["metrics"]["port"]))
            fetches = sum(stats.get(("reflection_cache", "fetches", pid), 0.0) for pid in pids)
            if fetches >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for pid in pids:
            assert ("grant_cache", "revision", pid) in stats, (pid, stats)
            assert ("audit_spool", "depth", pid) in stats, (pid, stats)
        assert fetches >= 1, stats  # whichever worker took the first call fetched the modes
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0, proc.output()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)
    finally:
        proc.stop()


def test_the_supervisor_of_workers_shows_envoys_fast_path_count(tmp_path):
    """With --workers N nobody scrapes a worker's registry: the supervisor reads Envoy's
    fast-path allow counter itself, from the admin URLs the workers would have read."""
    import http.server
    import json
    import threading

    from prometheus_client import generate_latest

    from extauthz.server import supervisor_registry

    stat = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
    asked = []

    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            body = json.dumps({"stats": [{"name": stat, "value": 42}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    admin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{admin.server_address[1]}"
    try:
        settings = load_settings(env={}, overrides={"store_url": "memory:", "fast_path.enabled": True,
                                                    "fast_path.envoy_admin_urls": [url]})
        text = generate_latest(supervisor_registry(settings, str(tmp_path))).decode()
        assert f'rpcauthz_fast_path_envoy_allowed{{envoy="{url}"}} 42.0' in text, text
        assert asked and asked[0].startswith("/stats?")
        off = load_settings(env={}, overrides={"store_url": "memory:", "fast_path.envoy_admin_urls": [url]})
        assert "rpcauthz_fast_path_envoy_allowed{" not in generate_latest(supervisor_registry(off, str(tmp_path))).decode()
    finally:
        admin.shutdown()


def _worker_stats(text: str) -> dict[tuple[str, str, str], float]:
    """``rpcauthz_<name>_stat{stat, pid}`` samples of a ``--workers N`` /metrics: (name, stat, pid) -> value."""
    out = {}
    for name, labels, value in re.findall(r'^rpcauthz_(\w+)_stat\{([^}]*)\} (\S+)$', text, re.M):
        kv = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(name, kv.get("stat", ""), kv.get("pid", ""))] = float(value)
    return out


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mpactl.app", "serve", "--store",
                            f"sqlite:///{tmp_path / 's.db'}", "--port", str(port)],
                           capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=no_metrics())
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_unreachable_store_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mpactl.app", "serve", "--port", "0", "--store",
                        f"postgresql://postgres@127.0.0.1:{free_port()}/x?connect_timeout=2"],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=no_metrics())
    assert r.returncode == 1 and "cannot open the store" in r.stderr, r.stderr


def test_bad_config_file_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("store_url: sqlite:///x.db\nidentity: {principal_clam: email}\n")
    r = subprocess.run([sys.executable, "-m", "mpactl.app", "serve", "-c", str(p)],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 2 and "identity.principal_clam: unknown key" in r.stderr


def test_dev_mode_warns_at_start_and_marks_decisions(tmp_path, demo_upstream):
    cfg = _config(tmp_path, demo_upstream, identity={"dev_mode": True})
    proc = ExtAuthzProcess(cfg, tmp_path).wait_ready()
    try:
        assert "DEV MODE" in proc.output() and "Never run this in production" in proc.output()
        req = external_auth_pb2.CheckRequest()
        req.attributes.request.http.path = PATH
        req.attributes.request.http.method = "POST"
        req.attributes.request.http.headers["x-dev-principal"] = "alice"
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as ch:
            resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)
        assert resp.status.code == 0
        assert resp.dynamic_metadata.fields["dev"].bool_value is True
        assert "x-dev-principal" in resp.ok_response.headers_to_remove
    finally:
        proc.stop()
