"""Configuration of the approvals server, on the shared model of :mod:`rpcauthz.settings`.

A YAML file (``mpactl approvals serve --config FILE``), then ``RPCAUTHZ_<SECTION>__<KEY>``
environment overrides (e.g. ``RPCAUTHZ_STORE_URL``, ``RPCAUTHZ_POLICY__MIN_REASON_LENGTH``,
``RPCAUTHZ_SLACK_WEBHOOK_URL``), then flags. Everything has a safe default except what must come
from the operator: the store URL and the token issuer (``issuer`` + ``jwks_url``, or, for
demos only, ``dev_login.issuer_key``). docs/approvals.md lists every key.

The server's former ``MPA_*`` variables are no longer read; :func:`load_approvals_config`
refuses to start while one is set and names its replacement.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from policy import Mode
from policy.modes import parse_default_mode
from policy.text_limits import DEFAULT_MIN_REASON_LENGTH
from reflection_cache.settings import ReflectionSettings
from rpcauthz.settings import ConfigError, Section, env_name, is_loopback, load

__all__ = ["ApprovalsConfig", "BrokerLinkSettings", "ConfigError", "DevLogin", "Listen",
           "OnCallEscalationSettings", "OtelSettings", "RequestPolicy", "RETIRED_VARIABLES",
           "load_approvals_config"]

#: The approvals server's former environment variables and the key that replaces each.
RETIRED_VARIABLES: dict[str, str] = {
    "MPA_STORE_URL": "store_url",
    "MPA_ISSUER": "issuer",
    "MPA_JWKS_URL": "jwks_url",
    "MPA_AUDIENCES": "audiences",
    "MPA_PUBLIC_URL": "public_url",
    "MPA_LISTEN_HOST": "listen.host",
    "MPA_LISTEN_PORT": "listen.port",
    "MPA_MIN_REASON_LENGTH": "policy.min_reason_length",
    "MPA_PENDING_TTL_SECONDS": "policy.pending_ttl",
    "MPA_APPROVAL_TTL_SECONDS": "policy.default_approval_ttl",
    "MPA_MAX_APPROVAL_TTL_SECONDS": "policy.max_approval_ttl",
    "MPA_REQUIRED_APPROVALS": "policy.required_approvals_by_mode / _by_service",
    "MPA_SLACK_WEBHOOK_URL": "slack_webhook_url",
    "MPA_SLACK_SPOOL": "slack_spool_path",
    "MPA_SLACK_USER_IDS": "slack_user_ids",
    "MPA_AUDIT_JSONL": "audit_jsonl_path",
    "MPA_CSRF_SECRET": "csrf_secret",
    "MPA_SECURE_COOKIES": "secure_cookies",
    "MPA_DEV_LOGIN": "dev_login",
    "MPA_DEV_ISSUER_KEY": "dev_login.issuer_key",
}


class RequestPolicy(Section):
    """The rules every approval request follows, beyond the mode table.

    Durations are seconds in YAML and variables. ``required_approvals_by_service`` wins over
    ``required_approvals_by_mode``; with neither, one approval is enough. ``max_approval_ttl``
    caps what a requester may ask for.
    """

    min_reason_length: int = DEFAULT_MIN_REASON_LENGTH
    pending_ttl: timedelta = timedelta(hours=1)
    default_approval_ttl: timedelta = timedelta(hours=1)
    max_approval_ttl: timedelta = timedelta(hours=8)
    required_approvals_by_mode: dict[Mode, int] = Field(default_factory=dict)
    required_approvals_by_service: dict[str, int] = Field(default_factory=dict)

    @field_validator("min_reason_length")
    @classmethod
    def _reason(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1: a reason is required")
        return v

    @field_validator("pending_ttl", "default_approval_ttl", "max_approval_ttl")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be positive")
        return v

    @field_validator("required_approvals_by_mode", mode="before")
    @classmethod
    def _mode_names(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {Mode.parse(k) if isinstance(k, str) else k: n for k, n in v.items()}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RequestPolicy:
        if self.default_approval_ttl > self.max_approval_ttl:
            raise ValueError("policy.default_approval_ttl cannot exceed policy.max_approval_ttl")
        for key, n in {**{m.name: n for m, n in self.required_approvals_by_mode.items()},
                       **self.required_approvals_by_service}.items():
            if n < 1:
                raise ValueError(f"required approvals for {key} must be at least 1, not {n}")
        return self

    def required_approvals(self, service: str, mode: Mode) -> int:
        """How many distinct approvers a request for ``service`` in ``mode`` needs."""
        if service in self.required_approvals_by_service:
            return self.required_approvals_by_service[service]
        return self.required_approvals_by_mode.get(mode, 1)


class Listen(Section):
    """Where the approvals server listens (HTTP)."""

    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)


class DevLogin(Section):
    """DEV ONLY: the sign-in form and ``/api/dev/token`` let anyone sign in as anyone.

    With ``issuer_key`` (a PEM file, created if missing) the server mints the dev tokens itself
    and serves their JWKS at ``<public_url>/.well-known/jwks.json`` (it prints that URL; give it
    to Envoy's jwt_authn); ``issuer`` and ``jwks_url`` must then be unset. Without it, the
    program embedding the server passes its dev issuer in (``mpactl demo``, tests).
    """

    issuer_key: pathlib.Path | None = None


class BrokerLinkSettings(Section):
    """The credential broker whose requests the web inbox lists (off when unset).

    The server calls it with each signed-in engineer's own token, over TLS pinned to
    ``certificate`` (the broker's PEM certificate), at ``address`` (``host:port``, usually the
    gateway's broker passthrough listener).
    """

    address: str
    certificate: pathlib.Path
    server_name: str = "broker.mpa.internal"


class OnCallEscalationSettings(Section):
    """Page security on-call for break-glass requests (PagerDuty Events API v2; off when unset).

    ``routing_key`` is the integration key (a secret: prefer
    ``RPCAUTHZ_ONCALL_ESCALATION__ROUTING_KEY``); ``url`` is the Events v2 endpoint.
    """

    routing_key: str = Field(repr=False, min_length=1)
    url: str = "https://events.pagerduty.com/v2/enqueue"
    spool_path: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class OtelSettings(Section):
    """Ship the audit log as OpenTelemetry logs and spans over OTLP/gRPC (off when unset).

    ``endpoint`` is the collector's OTLP gRPC address (``http://collector:4317``); ``insecure``
    sends without TLS (only to a collector on the same host or network segment); ``headers``
    are sent with every export (e.g. an API key: prefer ``RPCAUTHZ_OTEL__HEADERS``).
    """

    endpoint: str
    insecure: bool = False
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    service_name: str = "rpcauthz-approvals"
    timeout_seconds: float = Field(10.0, gt=0)
    batch_delay_ms: int = Field(1000, ge=1)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (e.g. http://collector:4317)")
        return v


class ApprovalsConfig(Section):
    """Everything the approvals server needs.

    ``jwks_url`` is where signing keys come from; ``issuer`` and ``audiences`` are checked on
    every token. ``public_url`` is the externally visible base URL used in request links
    (``auto``: ``http://<listen.host>:<port>``).
    """

    store_url: str
    listen: Listen = Listen()
    issuer: str = ""
    jwks_url: str = ""
    audiences: tuple[str, ...] = ("rpcauthz",)
    public_url: str = "auto"
    policy: RequestPolicy = RequestPolicy()
    dev_login: DevLogin | None = None
    #: Key of the CSRF tokens; random per process when unset. Set it (the same on every
    #: replica) when running more than one.
    csrf_secret: bytes | None = Field(None, repr=False)
    #: Session and login cookies carry ``Secure`` (sent over HTTPS only). ``null`` (default):
    #: yes, unless the service is reached over plain http on a loopback address (a dev box).
    secure_cookies: bool | None = None
    slack_webhook_url: str | None = Field(None, repr=False)
    slack_spool_path: str | None = None
    slack_user_ids: dict[str, str] = Field(default_factory=dict)
    audit_jsonl_path: str | None = None
    #: Principals who may read every request (``GET /api/v1/requests?scope=all``, any request
    #: page). Everyone else sees only requests they made, approved or may approve.
    auditors: tuple[str, ...] = ()
    expiry_sweep_seconds: float = Field(30.0, gt=0)
    #: PostgreSQL: the longest one statement may run (as the gateway's
    #: ``store_statement_timeout_s``); 0: no bound.
    store_statement_timeout_s: float = Field(5.0, ge=0, le=3600)
    broker: BrokerLinkSettings | None = None
    oncall_escalation: OnCallEscalationSettings | None = None
    otel: OtelSettings | None = None
    #: Ed25519 private key (PEM PKCS#8) signing approval receipts (mpa.receipts); the enclave
    #: broker pins its public half. Unset: no receipt route.
    receipt_key_path: str | None = None
    #: Where the modes of methods are read for requests engineers make themselves (the same
    #: section as the gateway's, reflection_cache/settings.py). Unset: only requests the
    #: gateway opened can be completed.
    reflection: ReflectionSettings | None = None
    #: Mode of a method with neither a method option nor a service default (as the gateway's).
    default_mode: Mode = Mode.BREAK_GLASS_ONLY
    _default_mode = field_validator("default_mode", mode="before")(parse_default_mode)

    @field_validator("dev_login", mode="before")
    @classmethod
    def _dev_login_flag(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return None
        return v

    @field_validator("auditors", mode="before")
    @classmethod
    def _auditor_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(a.strip() for a in v.split(",") if a.strip())
        return v

    @field_validator("audiences", mode="before")
    @classmethod
    def _audience_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(a.strip() for a in v.split(",") if a.strip())
        return v

    def cookies_secure(self) -> bool:
        """Whether cookies get ``Secure``: ``secure_cookies``, else yes unless plain http on loopback."""
        if self.secure_cookies is not None:
            return self.secure_cookies
        if self.public_url in ("", "auto"):
            return not is_loopback(self.listen.host)
        url = urlsplit(self.public_url)
        return not (url.scheme == "http" and is_loopback(url.hostname or ""))

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v not in ("", "auto") and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (or be auto)")
        return v

    @field_validator("slack_webhook_url")
    @classmethod
    def _no_empty_webhook(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _one_issuer(self) -> ApprovalsConfig:
        if not self.audiences:
            raise ValueError("audiences: at least one audience is required")
        own_dev_issuer = self.dev_login is not None and self.dev_login.issuer_key is not None
        if own_dev_issuer and (self.issuer or self.jwks_url):
            raise ValueError("dev_login.issuer_key runs a dev issuer that signs every token, "
                             "which contradicts issuer/jwks_url: set one or the other")
        if not own_dev_issuer and not (self.issuer and self.jwks_url):
            raise ValueError("issuer and jwks_url are required: tokens cannot be checked "
                             "without them (for a demo: dev_login.issuer_key instead)")
        return self


def load_approvals_config(path: str | os.PathLike[str] | None = None, *,
                          env: Mapping[str, str] | None = None,
                          overrides: Mapping[str, Any] | None = None) -> ApprovalsConfig:
    """Read ``path`` (YAML), apply ``RPCAUTHZ_*`` variables, then ``overrides`` (dotted keys).

    Raises ``ConfigError`` naming the key; also while a retired ``MPA_*`` server variable is
    set, naming what replaces it (a variable the server ignored would be a silent surprise).
    """
    env = os.environ if env is None else env
    retired = [f"{name} is no longer read: set {key} in the config file or "
               f"{env_name(*key.split(' ')[0].split('.'))}"
               for name, key in RETIRED_VARIABLES.items() if name in env]
    if retired:
        raise ConfigError("invalid approvals configuration: " + "; ".join(retired))
    return load(ApprovalsConfig, path, component="approvals", env=env, overrides=overrides)
