"""The whole gateway on 127.0.0.1 for end-to-end tests: real Envoy, the ext_authz server as a
subprocess, the demo gRPC services with reflection, and the dev JWT issuer's JWKS.

Usage (any test folder)::

    from tests.support.gateway_harness import GatewayStack, seed_grants

    with GatewayStack(tmp_path, store_url=f"sqlite:///{tmp_path}/s.db",
                      grants=[Grant("alice", Role.ENGINEER)]) as gw:
        result = gw.call("/rpcauthz.demo.v1.Accounts/ListAccounts", as_="alice")
        assert result.code is grpc.StatusCode.OK
        gw.gateway           # "127.0.0.1:PORT" of Envoy's engineers' listener
        gw.issuer.mint(sub)  # a dev token Envoy accepts
        gw.extauthz          # ExtAuthzProcess (.port, .channel(), .stop(), .output()); gw.restart_extauthz()
        gw.tls_certs         # the dev CA and certificates of the Envoy<->ext_authz mTLS link
        gw.envoy             # EnvoyProcess (.port, .admin_port, .stats(), .output())
        gw.upstreams         # {"accounts": DemoServer, "ledger": DemoServer}
        gw.access_log_lines()  # Envoy's JSON access log, parsed
        gw.metrics_url         # the ext_authz server's /metrics
        gw.server_stat("fast_path", "acked_grants_revision")  # one rpcauthz_<name>_stat gauge
        gw.wait_fast_path_grants(revision)  # Envoy ACKed a policy compiled from grants >= revision

Parameters: ``grants`` are written to the store before the server starts (so no wait for a
refresh); ``extauthz`` holds extra server settings as dotted keys
(``{"default_mode": "ENGINEERS_WITH_APPROVAL", "approvals.base_url": "http://..."}``);
``reflection_static`` adds services to the reflection endpoint map (e.g. a misbehaving
server for a made-up service). ``stop()`` (or leaving the ``with``) stops everything,
always. Building blocks (``EnvoyProcess``, ``ExtAuthzProcess``, ``render_gateway``) live in
``devstack/processes.py`` and are shared with ``mpactl demo`` and the benchmark.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from devstack import democlient
from devstack.devissuer import DevIssuer
from devstack.processes import EnvoyProcess, ExtAuthzProcess, free_port, render_gateway
from extauthz.dev_certs import make_dev_certs
from policy import Grant

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
LEDGER = "rpcauthz.demo.v1.Ledger"
#: A replica's /metrics samples: Envoys on its fast-path ADS, and Envoys that reconnected
#: holding its current policy (renewed, not resent).
FAST_PATH_ENVOYS = 'rpcauthz_fast_path_stat{stat="envoys"}'
FAST_PATH_RESUMED = 'rpcauthz_fast_path_xds_events_total{event="resume"}'


def seed_grants(store_url: str, grants: Iterable[Grant]) -> None:
    """Write ``grants`` through the real store."""
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        for g in grants:
            store.put_grant(g)
    finally:
        store.close()


def extauthz_config(*, port: int, store_url: str, reflection_static: Mapping[str, str],
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A server config dict (what ``mpactl serve --config`` reads)."""
    cfg: dict[str, Any] = {
        "store_url": store_url,
        "listen": {"host": "127.0.0.1", "port": port},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "drain_grace_s": 2,
        # One replica: nobody to move Checks to, so no drain notice (failover tests set theirs).
        "drain_notice_s": 0,
        "grants_poll_s": 0.2,
        # Roomier than production's 0.5 s / 800 ms / 1 s, so a loaded CI machine does not
        # turn a cold reflection fetch into a 503; tests of the deadlines set their own.
        "decision_deadline_ms": 3000,
        "reflection": {"endpoints": {"static": dict(reflection_static)}, "cache": {"deadline": 2.0}},
    }
    for dotted, value in (extra or {}).items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


class GatewayStack:
    """Issuer + demo upstreams + ext_authz server + Envoy, started in that order."""

    def __init__(self, workdir: pathlib.Path, *, store_url: str, grants: Iterable[Grant] = (),
                 extauthz: Mapping[str, Any] | None = None,
                 reflection_static: Mapping[str, str] | None = None,
                 with_extauthz: bool = True, tls: bool = True, replicas: int = 1,
                 envoy_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 fast_path: bool = False, fast_path_delta_xds: bool = True) -> None:
        self.workdir = pathlib.Path(workdir)
        self.store_url = store_url
        self.grants = list(grants)
        #: The Envoy-native fast path on (Envoy config and server's ``fast_path.enabled``).
        self.fast_path = fast_path
        #: Envoy asks for the fast path's policy over incremental (delta) ADS (False: SotW).
        self.fast_path_delta_xds = fast_path_delta_xds
        self.extauthz_extra = ({"fast_path.enabled": True, "fast_path.ttl_s": 3,
                                "fast_path.expiry_margin_s": 1} if fast_path else {})
        self.extauthz_extra.update(extauthz or {})
        self.reflection_extra = dict(reflection_static or {})
        self.with_extauthz = with_extauthz
        #: Changes the rendered Envoy config before Envoy starts (e.g. the static fast path).
        self.envoy_config = envoy_config
        #: Envoy and the server talk mTLS (as envoy/gateway.yaml ships) with dev certificates.
        self.tls_certs = make_dev_certs(self.workdir / "tls") if tls and with_extauthz else None
        deadline_ms = self.extauthz_extra.get("decision_deadline_ms", 3000)
        #: Envoy's ext_authz timeout: above the server's decision deadline, as in production.
        self.envoy_ext_authz_timeout_s = deadline_ms / 1000 + 1
        self.issuer = DevIssuer()
        self.jwks = None
        self.upstreams: dict[str, Any] = {}
        self.extauthz: ExtAuthzProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.access_log = self.workdir / "access.log"
        self._extauthz_config: dict[str, Any] | None = None
        #: With ``replicas > 1``: every ext_authz server behind Envoy's cluster (same store);
        #: ``extauthz`` is the first. ``replica_configs[i]`` is the config of ``replicas[i]``.
        self.replica_count = replicas
        self.replicas: list[ExtAuthzProcess | None] = []
        self.replica_configs: list[dict[str, Any]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> GatewayStack:
        from devstack.demo_services import start_demo_server

        try:
            self.jwks = self.issuer.serve()
            self.upstreams["accounts"] = start_demo_server(services=("accounts",))
            self.upstreams["ledger"] = start_demo_server(services=("ledger",))
            extauthz_port = None
            if self.with_extauthz:
                if self.grants:
                    seed_grants(self.store_url, self.grants)
                extauthz_port = free_port()
                self._extauthz_config = extauthz_config(
                    port=extauthz_port, store_url=self.store_url,
                    reflection_static={ACCOUNTS: self.upstreams["accounts"].address,
                                       LEDGER: self.upstreams["ledger"].address,
                                       **self.reflection_extra},
                    extra=self.extauthz_extra)
                if self.tls_certs is not None:
                    self._extauthz_config["listen"]["tls"] = self.tls_certs.server_settings()
                # The spool's default is relative to the server's working directory (the
                # checkout): every test's server would share one file. Each gets its own.
                audit = self._extauthz_config.setdefault("audit", {})
                if "spool_path" not in audit:
                    audit["spool_path"] = str(self.workdir / "audit-spool.db")
                self.start_extauthz()
                self.replicas, self.replica_configs = [self.extauthz], [self._extauthz_config]
                for i in range(1, self.replica_count):
                    cfg_i = json.loads(json.dumps(self._extauthz_config))
                    cfg_i["listen"]["port"] = free_port()
                    cfg_i["metrics"]["port"] = free_port()
                    if cfg_i["audit"]["spool_path"] is not None:  # one spool per replica
                        spool = pathlib.Path(cfg_i["audit"]["spool_path"])
                        cfg_i["audit"]["spool_path"] = str(spool.with_name(f"{spool.stem}-{i}{spool.suffix}"))
                    self.replica_configs.append(cfg_i)
                    self.replicas.append(None)
                    self.start_replica(i)
            cfg = render_gateway(listen_port=free_port(), admin_port=free_port(),
                                 extauthz_port=[c["listen"]["port"] for c in self.replica_configs] or extauthz_port,
                                 jwks_port=self.jwks.port,
                                 upstreams={"demo_accounts": self.upstreams["accounts"].port,
                                            "demo_ledger": self.upstreams["ledger"].port},
                                 access_log=self.access_log,
                                 ext_authz_timeout_s=self.envoy_ext_authz_timeout_s,
                                 tls_dir=self.tls_certs.directory if self.tls_certs is not None else None,
                                 fast_path=self.fast_path,
                                 fast_path_audit_file=self.extauthz_extra.get("fast_path.audit_file"),
                                 fast_path_shards=self.extauthz_extra.get("fast_path.shards", 1),
                                 fast_path_delta_xds=self.fast_path_delta_xds)
            if self.envoy_config is not None:
                cfg = self.envoy_config(cfg)
            self.envoy = EnvoyProcess(cfg, self.workdir).wait_ready()
            if self.with_extauthz:
                self._wait_cluster_healthy("ext_authz")
        except BaseException:
            self.stop()
            raise
        return self

    def start_extauthz(self) -> ExtAuthzProcess:
        assert self._extauthz_config is not None
        self.extauthz = ExtAuthzProcess(self._extauthz_config, self.workdir,
                                        client_tls=self.tls_certs).wait_ready()
        if self.replicas:
            self.replicas[0] = self.extauthz
        return self.extauthz

    def start_replica(self, i: int) -> ExtAuthzProcess:
        """(Re)start replica ``i`` on its port and wait until it reports SERVING."""
        proc = ExtAuthzProcess(self.replica_configs[i], self.workdir, name=f"extauthz-{i}",
                               client_tls=self.tls_certs).wait_ready()
        self.replicas[i] = proc
        if i == 0:
            self.extauthz = proc
        return proc

    def healthy_replicas(self) -> int:
        """How many ext_authz endpoints Envoy now counts healthy."""
        assert self.envoy is not None
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.envoy.admin_port}/clusters", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return sum(1 for ln in lines if ln.startswith("ext_authz::") and ln.endswith("::health_flags::healthy"))

    def restart_extauthz(self) -> ExtAuthzProcess:
        """SIGTERM the server (it drains), start it again on the same port and store."""
        assert self.extauthz is not None
        code = self.extauthz.stop()
        assert code == 0, f"ext_authz did not exit cleanly ({code}):\n{self.extauthz.output()[-3000:]}"
        self.start_extauthz()
        self._wait_cluster_healthy("ext_authz")
        return self.extauthz

    def _wait_cluster_healthy(self, cluster: str, timeout: float = 20.0) -> None:
        assert self.envoy is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envoy.cluster_healthy(cluster):
                return
            time.sleep(0.1)
        raise TimeoutError(f"envoy never saw cluster {cluster} healthy")

    def stop(self) -> None:
        for proc in (self.envoy, self.extauthz, *self.replicas[1:]):
            if proc is not None:
                proc.stop()
        for server in self.upstreams.values():
            server.stop(grace=0)
        if self.jwks is not None:
            self.jwks.close()
            self.jwks = None

    def __enter__(self) -> GatewayStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- calling through the gateway -------------------------------------------------------------

    @property
    def gateway(self) -> str:
        assert self.envoy is not None
        return f"127.0.0.1:{self.envoy.port}"

    @property
    def metrics_url(self) -> str:
        """The ext_authz server's Prometheus endpoint."""
        assert self._extauthz_config is not None
        return f"http://127.0.0.1:{self._extauthz_config['metrics']['port']}/metrics"

    def replica_metrics_url(self, i: int) -> str:
        """Replica ``i``'s Prometheus endpoint (``metrics_url`` is replica 0's)."""
        return f"http://127.0.0.1:{self.replica_configs[i]['metrics']['port']}/metrics"

    def replica_metrics(self, i: int) -> str:
        """Replica ``i``'s /metrics text."""
        return metrics_text(self.replica_metrics_url(i))

    def replica_sample(self, i: int, sample: str) -> float:
        """``metrics_sample`` of replica ``i`` now."""
        return metrics_sample(self.replica_metrics_url(i), sample)

    def ads_replica(self) -> int:
        """The replica serving (the one) Envoy's fast-path ADS stream now."""
        return next(i for i in range(len(self.replicas)) if self.replica_sample(i, FAST_PATH_ENVOYS) == 1)

    def fast_path_reloads(self) -> dict[str, int]:
        """Envoy's count of fast-path policy configs taken (ECDS ``config_reload``), per resource."""
        assert self.envoy is not None
        return {k: int(v) for k, v in self.envoy.stats("extension_config_discovery.").items()
                if k.endswith(".config_reload")}

    def server_stat(self, name: str, stat: str, replica: int = 0) -> float | None:
        """The ext_authz server's (replica ``replica``'s) ``rpcauthz_<name>_stat{stat="<stat>"}``
        gauge now (None: absent)."""
        want = f'rpcauthz_{name}_stat{{stat="{stat}"}} '
        url = self.metrics_url if replica == 0 else self.replica_metrics_url(replica)
        for line in metrics_text(url).splitlines():
            if line.startswith(want):
                return float(line[len(want):])
        return None

    def wait_fast_path_grants(self, revision: int, timeout: float = 15.0) -> float:
        """Wait until every Envoy connected to the server has ACKed a fast-path policy compiled
        from the store's grants at ``revision`` or later (fastpath.xds's ``acked_grants_revision``,
        on /metrics); seconds waited. No sleeping for "a push": the version Envoy holds says
        what it was compiled from."""
        t0 = time.monotonic()
        while True:
            acked = self.server_stat("fast_path", "acked_grants_revision")
            if acked is not None and acked >= revision:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no Envoy ACKed a fast-path policy of grants revision >= {revision} "
                                   f"within {timeout}s (acked: {acked})")
            time.sleep(0.02)

    def token(self, principal: str, **claims: Any) -> str:
        return self.issuer.mint(principal, **claims)

    def call(self, path: str, as_: str | None = None, *, token: str | None = None,
             data: dict | None = None, timeout: float = 10.0,
             metadata: list[tuple[str, str]] | None = None) -> democlient.CallResult:
        """Call ``path`` through Envoy as ``as_`` (a fresh dev token) or with ``token``."""
        if token is None and as_ is not None:
            token = self.token(as_)
        return democlient.call(self.gateway, path, token=token, data=data, timeout=timeout,
                               extra_metadata=metadata)

    def access_log_lines(self, wait_for: int = 1, timeout: float = 10.0) -> list[dict]:
        """Envoy's access log entries (it flushes about once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = []
            if self.access_log.exists():
                lines = [json.loads(ln) for ln in self.access_log.read_text().splitlines() if ln.strip()]
            if len(lines) >= wait_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.2)


#: An ENGINEERS_WITH_APPROVAL method of the demo's Accounts service.
READ_ACCOUNT = f"/{ACCOUNTS}/ReadAccount"


def metrics_text(url: str) -> str:
    """A Prometheus endpoint's text now."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metrics_sample(url: str, sample: str) -> float:
    """The value of ``sample`` (a metric's name with its labels, as /metrics prints it) at
    ``url`` now; 0 when absent."""
    for line in metrics_text(url).splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def gateway_with_approvals(tmp_path: pathlib.Path, extauthz: Mapping[str, Any] | None = None,
                           *, engineers: Iterable[str] = ("erin", "alice"),
                           approvals: Mapping[str, Any] | None = None,
                           ) -> Iterator[tuple[GatewayStack, Any, str]]:
    """Real Envoy + ext_authz + the approvals service as ``mpactl demo`` runs it (with the demo
    services' reflection, so ``mpa request rpc`` works before a call), on one SQLite store, with
    ``engineers`` (erin and alice). Yields (gateway, approvals server, approvals base
    URL); the gateway's request links point at that base URL. ``approvals`` holds extra keyword
    arguments of ``start_demo_approvals`` (e.g. ``config={"slack_webhook_url": ...}``)."""
    from devstack.demo_approvals import start_demo_approvals
    from policy import Role

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    grants = [Grant(e, Role.ENGINEER) for e in engineers]
    with GatewayStack(tmp_path, store_url=store_url, grants=grants,
                      extauthz={"approvals.base_url": base, **(extauthz or {})}) as gw, \
            start_demo_approvals(store_url, gw.issuer, gw.jwks.url, port=port,
                                 reflection={ACCOUNTS: gw.upstreams["accounts"].address,
                                             LEDGER: gw.upstreams["ledger"].address},
                                 **dict(approvals or {})) as approvals_server:
        yield gw, approvals_server, base
