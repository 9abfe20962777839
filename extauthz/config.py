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
from rpcauthz.settings import ENV_PREFIX, ConfigError, Section, load

__all__ = ["ENV_PREFIX", "ConfigError", "Settings", "load_settings"]


class Listen(Section):
    """Where the gRPC Authorization (and health) service listens."""

    host: str = "127.0.0.1"
    port: int = Field(9001, ge=0, le=65535)


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
    #: How many calls one approval of a gateway-opened request allows (null: any number
    #: until approval_ttl_s runs out).
    max_uses: int | None = Field(None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class Audit(Section):
    """Decision audit events are queued and written in the background."""

    queue_size: int = Field(10000, ge=1)
    #: Also audit plain allows (decision.allow). Denials and approvals are always audited.
    allows: bool = True
    #: After the first queued event, wait this long for more before writing, so a busy
    #: gateway writes one store transaction (one fsync) per window rather than per event.
    #: 0 writes at once. Events wait in memory either way; a drain flushes them.
    batch_window_ms: int = Field(50, ge=0, le=5000)


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
    #: checks. With several servers behind one Envoy cluster, set it above Envoy's
    #: health-check interval x unhealthy_threshold (10 s in gateway.yaml).
    drain_notice_s: float = Field(0, ge=0)
    max_path_length: int = Field(512, ge=8, le=8192)
    identity: Identity = Identity()
    approvals: Approvals = Approvals()
    audit: Audit = Audit()
    #: Endpoints, cache and TLS: reflection_cache/settings.py (shared with the approvals server).
    reflection: ReflectionSettings = ReflectionSettings()
    #: SQLite: how often the store is polled for grant changes (PostgreSQL notifies).
    grants_poll_s: float = Field(1.0, gt=0)
    #: Full reload of the in-memory grants, as a safety net for lost notifications.
    grants_reload_s: float = Field(30.0, gt=0)
    #: Past this age without a successful load, grants are unusable: every check is a 503.
    grants_max_staleness_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _workers_need_port(self) -> Settings:
        if self.workers > 1 and self.listen.port == 0:
            raise ValueError("workers > 1 share one port through SO_REUSEPORT: set listen.port")
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
