"""Broker configuration: the roles and clusters it brokers, the engineers, and caller identity.

``broker.yaml`` is read on the shared configuration model (:mod:`rpcauthz.settings`: pydantic,
unknown keys refused, ``RPCAUTHZ_<SECTION>__<KEY>`` overrides, errors naming the key and line)
by :class:`BrokerFile`, and turned into the runtime :class:`BrokerConfig`.

The configuration is part of what the enclave image measures in production, so changing who
may obtain which credentials goes through the same two-person measurement process as code.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from policy import Grant, GrantSet, Mode, Role
from policy.text_limits import DEFAULT_MIN_REASON_LENGTH, MAX_REASON
from rpcauthz.settings import ConfigError as SettingsError
from rpcauthz.settings import Section, describe, load

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", re.ASCII)


class ConfigError(ValueError):
    """The broker configuration is invalid; the message names the field (and its file line)."""


@dataclasses.dataclass(frozen=True)
class AwsRole:
    name: str
    arn: str
    mode: Mode = Mode.ENGINEERS_WITH_APPROVAL
    max_duration: int = 3600


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    server: str
    audience: str
    groups: tuple[str, ...]
    mode: Mode = Mode.ENGINEERS_WITH_APPROVAL
    max_duration: int = 3600


@dataclasses.dataclass(frozen=True)
class Identity:
    """How callers prove who they are: a JWT from this issuer, checked against these keys."""

    issuer: str
    audience: str
    jwks: Mapping[str, Any]
    principal_claim: str = "sub"


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    identity: Identity
    grants: tuple[Grant, ...]
    roles: Mapping[str, AwsRole]
    clusters: Mapping[str, Cluster]
    oidc_issuer: str
    server_name: str = "broker.mpa.internal"
    aws_region: str = "eu-west-2"
    sts_endpoint_url: str | None = None
    pending_ttl_seconds: int = 3600
    approval_ttl_seconds: int = 3600
    #: The shortest reason a request may give (as the approvals server's ``policy.min_reason_length``).
    min_reason_length: int = DEFAULT_MIN_REASON_LENGTH
    #: (host, port) to serve Prometheus ``/metrics`` on; None (the default): no metrics.
    metrics_listen: tuple[str, int] | None = None

    def grant_set(self) -> GrantSet:
        return GrantSet(self.grants)

    @classmethod
    def from_file(cls, path: str | Path, *, env: Mapping[str, str] | None = None) -> BrokerConfig:
        """Read the YAML file at ``path``, then ``RPCAUTHZ_*`` environment overrides (the one
        naming rule of :mod:`rpcauthz.settings`, e.g. ``RPCAUTHZ_AWS__REGION``); ``jwks_file``
        is relative to the file's folder."""
        try:
            model = load(BrokerFile, path, component="broker", env=env)
        except SettingsError as e:
            raise ConfigError(str(e)) from None
        return model.to_config(base=Path(path).parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path | None = None) -> BrokerConfig:
        """From a mapping shaped like the YAML file (``jwks_file`` relative to ``base``)."""
        try:
            model = BrokerFile.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(describe(e, component="broker")) from None
        return model.to_config(base=base)


# -- the file's schema (pydantic, on rpcauthz.settings) ----------------------------------------

def _mode(value: Any) -> Mode:
    mode = Mode.parse(value) if isinstance(value, str) else Mode(value)
    if not mode.needs_approval:
        raise ValueError(f"{mode.name}: brokered credentials always need approval")
    return mode


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} must be lowercase letters, digits and dashes")
    return value


Required = Annotated[str, Field(min_length=1)]
Duration = Annotated[int, Field(ge=60, le=3600)]


class IdentityFile(Section):
    issuer: Required
    audience: Required
    jwks: dict[str, Any] | None = None
    jwks_file: Path | None = None
    principal_claim: str = "sub"


class GrantFile(Section):
    principal: Required
    role: Role = Role.ENGINEER
    service: str | None = None

    @model_validator(mode="after")
    def _valid_grant(self) -> GrantFile:
        self.grant()  # e.g. a contributor grant needs its service
        return self

    def grant(self) -> Grant:
        return Grant(principal=self.principal, role=self.role, service=self.service)


class RoleFile(Section):
    name: Required
    arn: Required
    mode: Mode = Mode.ENGINEERS_WITH_APPROVAL
    max_duration: Duration = 3600

    _check_name = field_validator("name")(_name)
    _check_mode = field_validator("mode", mode="before")(_mode)

    @field_validator("arn")
    @classmethod
    def _arn(cls, v: str) -> str:
        if not _ROLE_ARN.fullmatch(v):
            raise ValueError(f"{v!r} is not an IAM role ARN")
        return v


class ClusterFile(Section):
    name: Required
    server: str = ""
    audience: str | None = None
    groups: list[str]
    mode: Mode = Mode.ENGINEERS_WITH_APPROVAL
    max_duration: Duration = 3600

    _check_name = field_validator("name")(_name)
    _check_mode = field_validator("mode", mode="before")(_mode)


class AwsFile(Section):
    region: str = "eu-west-2"
    sts_endpoint_url: str | None = None
    roles: list[RoleFile] = Field(default_factory=list)


class KubernetesFile(Section):
    issuer: str = ""
    clusters: list[ClusterFile] = Field(default_factory=list)


class BrokerFile(Section):
    """``broker.yaml`` (docs/enclave-broker.md)."""

    identity: IdentityFile
    grants: list[GrantFile] = Field(default_factory=list)
    aws: AwsFile = AwsFile()
    kubernetes: KubernetesFile = KubernetesFile()
    server_name: str = "broker.mpa.internal"
    pending_ttl_seconds: int = 3600
    approval_ttl_seconds: int = 3600
    #: The shortest reason a request may give, in characters (a reason is always required).
    min_reason_length: int = Field(DEFAULT_MIN_REASON_LENGTH, ge=1, le=MAX_REASON)
    #: ``host:port`` for Prometheus ``/metrics`` (e.g. ``127.0.0.1:9464``); unset: off.
    metrics_listen: str | None = None

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            _host_port(v)
        return v

    @model_validator(mode="after")
    def _offers_something(self) -> BrokerFile:
        if not self.aws.roles and not self.kubernetes.clusters:
            raise ValueError("the broker offers nothing: configure aws.roles or kubernetes.clusters")
        if self.kubernetes.clusters and not self.kubernetes.issuer:
            raise ValueError("kubernetes.issuer is required when clusters are configured")
        return self

    def to_config(self, base: Path | None = None) -> BrokerConfig:
        """The broker's runtime configuration (reads ``identity.jwks_file``)."""
        ident = self.identity
        jwks = ident.jwks
        if jwks is None and ident.jwks_file is not None:
            p = ident.jwks_file
            p = (base / p) if base and not p.is_absolute() else p
            try:
                jwks = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"identity.jwks_file: cannot read {p}: {e}") from None
        if not isinstance(jwks, Mapping) or not jwks.get("keys"):
            raise ConfigError("identity.jwks (or identity.jwks_file) must hold at least one key")
        return BrokerConfig(
            identity=Identity(ident.issuer, ident.audience, jwks, ident.principal_claim),
            grants=tuple(g.grant() for g in self.grants),
            roles={r.name: AwsRole(r.name, r.arn, r.mode, r.max_duration) for r in self.aws.roles},
            clusters={c.name: Cluster(c.name, c.server, c.audience or c.name, tuple(c.groups), c.mode,
                                      c.max_duration) for c in self.kubernetes.clusters},
            oidc_issuer=self.kubernetes.issuer, server_name=self.server_name,
            aws_region=self.aws.region, sts_endpoint_url=self.aws.sts_endpoint_url,
            pending_ttl_seconds=self.pending_ttl_seconds, approval_ttl_seconds=self.approval_ttl_seconds,
            min_reason_length=self.min_reason_length,
            metrics_listen=_host_port(self.metrics_listen) if self.metrics_listen else None)


def _host_port(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); a ValueError names what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)
