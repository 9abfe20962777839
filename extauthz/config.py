"""Configuration of the ext_authz server, on the shared model of :mod:`rpcauthz.settings`.

Every key is optional except ``store_url``; unknown keys are errors, so a typo never
silently falls back to a default. A YAML file (``mpactl serve --config``), then environment
overrides ``RPCAUTHZ_<SECTION>__<KEY>`` (double underscore between levels, case-insensitive),
e.g. ``RPCAUTHZ_LISTEN__PORT=9001`` or ``RPCAUTHZ_STORE_URL=postgresql://...``, then flags.
A bad value raises ``ConfigError`` whose message names the key (and the variable or line).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from policy import Mode
from policy.modes import parse_default_mode
from reflection_cache.settings import ReflectionSettings
from rpcauthz.settings import ENV_PREFIX, ConfigError, Section, is_loopback, load

__all__ = ["ENV_PREFIX", "ConfigError", "FastPath", "Listen", "ListenTls", "Settings", "is_loopback", "load_settings"]


class ListenTls(Section):
    """mTLS on the TCP listener: the server's certificate, and who may connect (Envoy).

    Clients must present a certificate signed by ``client_ca`` (the TLS handshake fails
    otherwise), and a Check is answered only when that certificate names one of
    ``client_names`` (a DNS subject alternative name or the common name). ``mpactl dev-certs``
    makes a dev CA and matching files.
    """

    cert: str
    key: str
    client_ca: str
    client_names: list[str] = Field(min_length=1)

    @field_validator("client_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not n.strip() for n in v):
            raise ValueError("names must not be empty")
        return v


class Listen(Section):
    """Where the gRPC Authorization (and health) service listens.

    Whoever can send a Check can claim any identity (the JWT payload is metadata Envoy fills
    in), so the listener must be reachable by Envoy alone: mTLS (``tls``), a unix socket
    (``unix_socket``, file mode 0660) for a sidecar, or plain TCP on a loopback address. A
    non-loopback address without TLS is refused unless ``allow_plaintext`` says otherwise,
    and then it is logged loudly at every start.
    """

    host: str = "127.0.0.1"
    #: ``null``: no TCP listener (``unix_socket`` only).
    port: int | None = Field(9001, ge=0, le=65535)
    tls: ListenTls | None = None
    #: Also (or only, with ``port: null``) serve on this unix socket path.
    unix_socket: str | None = None
    #: Explicit opt-out: serve plaintext on a non-loopback address. Anyone who reaches the
    #: port can then forge identities. Never in production.
    allow_plaintext: bool = False

    @model_validator(mode="after")
    def _trusted(self) -> Listen:
        if self.port is None and self.unix_socket is None:
            raise ValueError("give listen.port, listen.unix_socket, or both")
        if self.port is not None and self.tls is None and not is_loopback(self.host) and not self.allow_plaintext:
            raise ValueError(f"listen.host {self.host!r} is not a loopback address and listen.tls is not set: "
                             "anyone who reaches the port could send Checks with forged identities. "
                             "Configure listen.tls (mTLS, see `mpactl dev-certs`), listen on 127.0.0.1 or a "
                             "unix socket, or set listen.allow_plaintext: true (never in production)")
        return self


class Metrics(Section):
    """Prometheus ``/metrics`` over plain HTTP. ``port: null`` turns it off."""

    host: str = "127.0.0.1"
    port: int | None = Field(9464, ge=0, le=65535)


class Identity(Section):
    """How the caller is identified.

    Production: from the JWT payload that Envoy's jwt_authn filter verified and put in
    the request's metadata (``payload_in_metadata: <payload_key>``). Dev mode takes the
    principal from a plain header instead: anyone can claim anyone, so it is off by
    default, logs a warning at start, and every decision it makes is marked ``dev``.
    """

    metadata_namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    principal_claim: str = "sub"
    dev_mode: bool = False
    dev_principal_header: str = "x-dev-principal"

    @field_validator("dev_principal_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        if not v or v.startswith(":"):
            raise ValueError("must be an ordinary header name")
        return v.lower()


class Approvals(Section):
    """Requests the gateway opens when a call needs approval."""

    base_url: str = "http://127.0.0.1:8080"
    pending_ttl_s: float = Field(3600, gt=0)
    approval_ttl_s: float = Field(3600, gt=0)
    #: Scope gateway-opened requests to the exact request body (its SHA-256).
    bind_to_body: bool = False
    #: ...only for these modes (e.g. [BREAK_GLASS_ONLY]); ``bind_to_body: true`` means all.
    bind_to_body_modes: list[Mode] = Field(default_factory=list)
    #: How many calls one approval of a gateway-opened request allows (null: any number
    #: until approval_ttl_s runs out).
    max_uses: int | None = Field(None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("bind_to_body_modes", mode="before")
    @classmethod
    def _modes(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [Mode.parse(m) if isinstance(m, str) else m for m in v]
        return v

    def binds_body(self, mode: Mode) -> bool:
        """Are gateway-opened requests in ``mode`` scoped to the call's body?"""
        return self.bind_to_body or mode in self.bind_to_body_modes


class Audit(Section):
    """Decision audit events are queued and written in the background."""

    queue_size: int = Field(10000, ge=1)
    #: Also audit plain allows (decision.allow). Denials and approvals are always audited.
    allows: bool = True
    #: After the first queued event, wait this long for more before writing, so a busy
    #: gateway writes one store transaction (one fsync) per window rather than per event.
    #: 0 writes at once. Events wait in memory either way; a drain flushes them.
    batch_window_ms: int = Field(50, ge=0, le=5000)
    #: The local SQLite spool every decision event goes through (fsync'd before the check
    #: is answered, then shipped to the store exactly once): survives kill -9 and store
    #: outages. A relative path is taken in the state directory (``state_dir()``). null
    #: turns it off (loudly logged): events then wait in memory and are lost with the process
    #: or dropped when the store is away.
    spool_path: str | None = "audit-spool.db"
    #: fsync the spool at every group commit (SQLite synchronous=FULL): an answered check's
    #: event survives a kill -9 *and* a host crash or power loss. false (synchronous=NORMAL,
    #: loudly logged): it survives a kill -9 of the server (the event is in the OS page cache
    #: before the answer) but not a host crash; ~35% less time per check at concurrency 1.
    spool_fsync: bool = True
    #: The spool's bound; past it events are dropped (rpcauthz_audit_dropped_total{why="spool_full"}).
    spool_max_events: int = Field(1_000_000, ge=1)
    #: How often the spool is replayed while it holds events.
    replay_interval_s: float = Field(1.0, gt=0, le=60)
    #: The fast path's access log (with the spool on) writes each message's events straight
    #: to the store, one transaction whose commit is their durability, while the store
    #: answers within this long; past it, or on a store error, they and the next messages go
    #: through the spool until it ships again. 0: always through the spool.
    direct_write_ms: int = Field(800, ge=0, le=60000)


STATE_DIR_ENV = "RPCAUTHZ_STATE_DIR"


def state_dir() -> str:
    """Where relative state files (the audit spool) live: ``$RPCAUTHZ_STATE_DIR``, else
    systemd's ``$STATE_DIRECTORY`` (its first entry; set by ``StateDirectory=``), else the
    working directory."""
    chosen = os.environ.get(STATE_DIR_ENV) or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return chosen or os.getcwd()


def spool_file(audit: Audit) -> str | None:
    """The audit spool's file for ``audit`` (None: turned off)."""
    if audit.spool_path is None:
        return None
    return os.path.join(state_dir(), os.path.expanduser(audit.spool_path))


class Health(Section):
    """When the gRPC health service says NOT_SERVING (see extauthz/readiness.py).

    Besides a drain: while the grants in memory are past ``grants_max_staleness_s``, or the
    store has failed every probe for ``store_lost_after_s``.
    """

    #: How often the grants and the store are checked.
    interval_s: float = Field(1.0, gt=0, le=60)
    #: A store probe (one cheap query) slower than this counts as a failure.
    store_timeout_s: float = Field(2.0, gt=0, le=60)
    #: The store must fail this long before this replica reports NOT_SERVING, so one slow
    #: query does not take every replica out at once.
    store_lost_after_s: float = Field(5.0, ge=0, le=3600)


class FastPath(Section):
    """The Envoy-native fast path (docs/extauthz.md, "The fast path"): the server also serves
    Envoy's RBAC filter config over ADS (ECDS resource ``rpcauthz_fast_path``) on its own
    port, so Envoy allows ENGINEERS_WITHOUT_APPROVAL and CONTRIBUTORS_WITHOUT_APPROVAL calls
    of eligible callers itself; everything else still comes here. Off by default: today's
    behaviour exactly. The gateway must be rendered with the fast path on as well.

    The server also takes Envoy's gRPC access log (ALS, ``envoy.service.accesslog.v3``) on its
    listeners and writes each fast-path allow as one decision audit event through the same
    spool as Checks (extauthz/access_log.py)."""

    enabled: bool = False
    #: The ``log_name`` of Envoy's ``http_grpc`` access log that carries fast-path allows (the
    #: gateway's, ``fastpath.envoy_config.LOG_NAME``, unless rendered with another);
    #: entries of any other log are counted malformed and not audited.
    log_name: str = "rpcauthz_fast_path"
    #: Instead of ALS: the file Envoy's file access log writes fast-path allows to (the
    #: gateway rendered with ``audit_file``), tailed here (extauthz/file_audit.py), its read
    #: position kept in the audit spool's database. null (the default): ALS. Only Envoy may
    #: write this file: a writer could forge audit records of allows (never an allow).
    audit_file: str | None = None
    #: How often the audit file is looked at for new lines, rotation and truncation.
    audit_file_poll_s: float = Field(0.2, gt=0, le=10)
    #: Envoy admin URLs (``http://127.0.0.1:9901``) whose fast-path allow counter /metrics
    #: shows beside ours (``rpcauthz_fast_path_envoy_allowed``), read at each scrape.
    envoy_admin_urls: list[str] = Field(default_factory=list)
    #: That counter's name in Envoy's stats: ``http.<stat_prefix>.rbac.<shadow_rules_stat_prefix>.shadow_allowed``
    #: (Envoy 1.40 puts a dot after the shadow prefix in stat names).
    envoy_allowed_stat: str = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
    #: How long an Envoy keeps a policy without hearing from this server; past it, Envoy
    #: falls back to the empty policy (everything to ext_authz). Also how long a grant
    #: revocation can take to reach Envoy when this server dies mid-push.
    ttl_s: float = Field(30.0, ge=1, le=3600)
    #: How often the resource is re-sent to renew the TTL (default: a third of ``ttl_s``).
    refresh_s: float | None = Field(None, gt=0)
    #: A grant is compiled in only if it is still valid this long after ``ttl_s`` (so an
    #: expiring grant leaves Envoy before it expires, even if this server dies).
    expiry_margin_s: float = Field(10.0, ge=0, le=3600)
    #: After a grant or mode change, wait this long for more before recompiling.
    debounce_s: float = Field(0.1, ge=0, le=10)
    #: How often grants (memory) are looked at for a change.
    poll_s: float = Field(0.05, gt=0, le=5)
    #: How often the reflection cache's modes are looked at (and entries past their TTL refreshed).
    modes_check_s: float = Field(1.0, gt=0, le=60)
    #: At start, up to this long learning the modes of every service named in a contributor
    #: grant or listed by a ``reflection.endpoints.static`` endpoint (reflection, 16 at once;
    #: the lists take at most half of it, and an endpoint that cannot list stands for its map
    #: keys) before the first policy is compiled; Envoys that connect meanwhile are answered
    #: only then (they keep what they hold, within ``ttl_s``). So a restarted server's first
    #: policy is not narrower than the one it replaces. 0: compile at once from what is known.
    warm_s: float = Field(10.0, ge=0, le=300)
    #: Services in dry-run (the catalog's ``dry_run: true``): never compiled in.
    dry_run_services: list[str] = Field(default_factory=list)
    #: The largest RE2 alternation in one matcher (Envoy's runtime
    #: ``re2.max_program_size.error_level`` must allow it; the rendered gateway does).
    max_regex_chars: int = Field(50_000, ge=1000, le=1_000_000)
    #: The policy in this many parts, by a hash of the principal (ECDS resources
    #: ``rpcauthz_fast_path.<k>-of-<n>``): a grant change then resends one part, not the whole
    #: policy. The gateway must be rendered with the same number (``gateway.fast_path.shards``).
    #: 1 (the default): one resource, ``rpcauthz_fast_path``.
    shards: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _refresh_below_ttl(self) -> FastPath:
        if self.refresh_s is not None and self.refresh_s >= self.ttl_s:
            raise ValueError(f"refresh_s ({self.refresh_s}) must be below ttl_s ({self.ttl_s}), "
                             "or Envoy drops the policy between refreshes")
        return self

    @field_validator("envoy_admin_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return [u.rstrip("/") for u in v]

    @field_validator("audit_file")
    @classmethod
    def _a_path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a path, or null for ALS")
        return v

    @field_validator("log_name", "envoy_allowed_stat")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Settings(Section):
    """The whole server configuration."""

    store_url: str
    listen: Listen = Listen()
    metrics: Metrics = Metrics()
    workers: int = Field(1, ge=1, le=64)
    #: Mode of a method with neither a method option nor a service default.
    default_mode: Mode = Mode.BREAK_GLASS_ONLY
    _default_mode = field_validator("default_mode", mode="before")(parse_default_mode)
    #: Our own deadline for one decision. Keep it below Envoy's ext_authz timeout, so a slow
    #: dependency ends as our 503 rather than Envoy's timeout, and above the reflection deadline.
    decision_deadline_ms: int = Field(800, ge=10, le=60000)
    #: On SIGTERM: stop accepting, report NOT_SERVING, finish in-flight checks within this.
    drain_grace_s: float = Field(10, ge=0)
    #: On SIGTERM, keep serving this long after turning NOT_SERVING before refusing new
    #: checks, so every Envoy's health checks see it first and move Checks to the other
    #: replicas (a rolling restart then costs no call). Keep it above Envoy's health-check
    #: interval x unhealthy_threshold plus jitter (about 2.2 s in gateway.yaml). A lone
    #: server gains nothing from it: 0 there.
    drain_notice_s: float = Field(5, ge=0)
    max_path_length: int = Field(512, ge=8, le=8192)
    identity: Identity = Identity()
    approvals: Approvals = Approvals()
    audit: Audit = Audit()
    health: Health = Health()
    #: Endpoints, cache and TLS: reflection_cache/settings.py (shared with the approvals server).
    reflection: ReflectionSettings = ReflectionSettings()
    #: SQLite: how often the store is polled for grant changes (PostgreSQL notifies).
    grants_poll_s: float = Field(0.25, gt=0)
    #: PostgreSQL: the longest one statement may run (``statement_timeout`` of the pooled
    #: connections, unless the DSN, the role or the database sets one); past it the
    #: statement is cancelled and the call fails closed. 0: no bound.
    store_statement_timeout_s: float = Field(5.0, ge=0, le=3600)
    #: Full reload of the in-memory grants, as a safety net for lost notifications.
    grants_reload_s: float = Field(30.0, gt=0)
    #: Past this age without a successful load, grants are unusable: every check is a 503.
    grants_max_staleness_s: float = Field(120.0, gt=0)
    #: The Envoy-native fast path (RBAC over xDS; Envoy streams its allows here for the
    #: audit); off by default.
    fast_path: FastPath = FastPath()

    @model_validator(mode="after")
    def _workers_need_port(self) -> Settings:
        if self.workers > 1 and not self.listen.port:
            raise ValueError("workers > 1 share one port through SO_REUSEPORT: set listen.port")
        if self.workers > 1 and self.listen.unix_socket:
            raise ValueError("workers > 1 cannot share listen.unix_socket: run one worker per socket")
        if self.fast_path.enabled and self.identity.dev_mode:
            raise ValueError("fast_path.enabled needs verified identities: Envoy's RBAC filter reads the "
                             "principal from jwt_authn's metadata, and identity.dev_mode takes it from a "
                             "header; turn one of them off")
        if self.fast_path.audit_file is not None and self.audit.spool_path is None:
            raise ValueError("fast_path.audit_file keeps its read position in the audit spool's database: "
                             "it needs audit.spool_path")
        if self.grants_max_staleness_s <= self.grants_reload_s:
            raise ValueError("grants_max_staleness_s must be longer than grants_reload_s")
        if self.reflection.cache.deadline * 1000 >= self.decision_deadline_ms:
            raise ValueError(f"reflection.cache.deadline ({self.reflection.cache.deadline}s) must be below "
                             f"decision_deadline_ms ({self.decision_deadline_ms} ms), so a slow "
                             "service is reported as such")
        return self


def load_settings(path: str | os.PathLike[str] | None = None, *,
                  env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read ``path`` (YAML), apply ``RPCAUTHZ_*`` environment overrides, then ``overrides``
    (dotted keys, from ``mpactl serve`` flags); see :func:`rpcauthz.settings.load`."""
    return load(Settings, path, component="ext_authz", env=env, overrides=overrides)
