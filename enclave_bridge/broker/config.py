"""Broker configuration: the roles and clusters it brokers, the engineers, and caller identity.

The configuration is part of what the enclave image measures in production, so changing who
may obtain which credentials goes through the same two-person measurement process as code.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from policy import Grant, GrantSet, Mode, Role

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")


class ConfigError(ValueError):
    """The broker configuration is invalid; the message names the field."""


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

    def grant_set(self) -> GrantSet:
        return GrantSet(self.grants)

    @classmethod
    def from_file(cls, path: str | Path) -> BrokerConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read broker config {path}: {e}") from None
        return cls.from_dict(data or {}, base=Path(path).parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path | None = None) -> BrokerConfig:
        def need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
            if key not in mapping or mapping[key] in (None, ""):
                raise ConfigError(f"{where}.{key} is required")
            return mapping[key]

        ident = need(data, "identity", "config")
        jwks = ident.get("jwks")
        if jwks is None and ident.get("jwks_file"):
            p = Path(ident["jwks_file"])
            jwks = json.loads(((base / p) if base and not p.is_absolute() else p).read_text())
        if not jwks or not jwks.get("keys"):
            raise ConfigError("identity.jwks (or identity.jwks_file) must hold at least one key")
        identity = Identity(need(ident, "issuer", "identity"), need(ident, "audience", "identity"), jwks,
                            ident.get("principal_claim", "sub"))

        grants = []
        for i, g in enumerate(data.get("grants", [])):
            try:
                grants.append(Grant(principal=need(g, "principal", f"grants[{i}]"), role=Role(g.get("role", "engineer")),
                                    service=g.get("service")))
            except ValueError as e:
                raise ConfigError(f"grants[{i}]: {e}") from None

        def mode_of(entry: Mapping[str, Any], where: str) -> Mode:
            try:
                mode = Mode.parse(entry.get("mode", "ENGINEERS_WITH_APPROVAL"))
            except ValueError as e:
                raise ConfigError(f"{where}.mode: {e}") from None
            if not mode.needs_approval:
                raise ConfigError(f"{where}.mode is {mode.name}: brokered credentials always need approval")
            return mode

        def duration(entry: Mapping[str, Any], where: str) -> int:
            value = int(entry.get("max_duration", 3600))
            if not 60 <= value <= 3600:
                raise ConfigError(f"{where}.max_duration must be 60..3600 seconds, got {value}")
            return value

        roles = {}
        for i, r in enumerate(data.get("aws", {}).get("roles", [])):
            where = f"aws.roles[{i}]"
            name, arn = need(r, "name", where), need(r, "arn", where)
            if not _NAME.match(name):
                raise ConfigError(f"{where}.name {name!r} must be lowercase letters, digits and dashes")
            if not _ROLE_ARN.match(arn):
                raise ConfigError(f"{where}.arn {arn!r} is not an IAM role ARN")
            roles[name] = AwsRole(name, arn, mode_of(r, where), duration(r, where))

        clusters = {}
        k8s = data.get("kubernetes", {}) or {}
        for i, c in enumerate(k8s.get("clusters", [])):
            where = f"kubernetes.clusters[{i}]"
            name = need(c, "name", where)
            if not _NAME.match(name):
                raise ConfigError(f"{where}.name {name!r} must be lowercase letters, digits and dashes")
            groups = tuple(need(c, "groups", where))
            clusters[name] = Cluster(name, c.get("server", ""), c.get("audience", name), groups,
                                     mode_of(c, where), duration(c, where))
        if not roles and not clusters:
            raise ConfigError("the broker offers nothing: configure aws.roles or kubernetes.clusters")
        oidc_issuer = k8s.get("issuer", "")
        if clusters and not oidc_issuer:
            raise ConfigError("kubernetes.issuer is required when clusters are configured")
        aws = data.get("aws", {}) or {}
        return cls(identity=identity, grants=tuple(grants), roles=roles, clusters=clusters,
                   oidc_issuer=oidc_issuer, server_name=data.get("server_name", "broker.mpa.internal"),
                   aws_region=aws.get("region", "eu-west-2"), sts_endpoint_url=aws.get("sts_endpoint_url"),
                   pending_ttl_seconds=int(data.get("pending_ttl_seconds", 3600)),
                   approval_ttl_seconds=int(data.get("approval_ttl_seconds", 3600)))
