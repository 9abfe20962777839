"""Where to reach each service's reflection: a static map, a host template, a default.

    resolver = EndpointResolver(
        static={"rpcauthz.demo.v1.Accounts": "127.0.0.1:50061",   # one service
                "payments": "payments-reflection:50051"},          # a package and its subpackages
        template="{name_lower}.{package_dashed}.svc:50051",        # everything else
    )
    resolver.resolve("payments.v2.Refunds")  # -> "payments-reflection:50051"

Order: exact service name in ``static``; the longest package prefix in ``static`` (matching
whole dot-separated segments); ``template``; ``default``; otherwise :class:`UnknownService`.

Template placeholders, shown for the service ``rpcauthz.demo.v1.Ledger``:

- ``{service}``: ``rpcauthz.demo.v1.Ledger`` (full name)
- ``{service_lower}``: ``rpcauthz.demo.v1.ledger``
- ``{service_dashed}``: ``rpcauthz-demo-v1-ledger`` (lowercase, dots and underscores to dashes)
- ``{package}``: ``rpcauthz.demo.v1``
- ``{package_dashed}``: ``rpcauthz-demo-v1``
- ``{name}``: ``Ledger`` (short name)
- ``{name_lower}``: ``ledger``
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from policy.model import SERVICE_NAME
from reflection_cache.types import UnknownService

_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}|unix:.+")
PLACEHOLDERS = ("service", "service_lower", "service_dashed", "package", "package_dashed",
                "name", "name_lower")


def placeholders(service: str) -> dict[str, str]:
    """The template values for ``service`` (see the module docstring)."""
    package, _, name = service.rpartition(".")
    return {
        "service": service,
        "service_lower": service.lower(),
        "service_dashed": service.lower().replace(".", "-").replace("_", "-"),
        "package": package,
        "package_dashed": package.lower().replace(".", "-").replace("_", "-"),
        "name": name,
        "name_lower": name.lower(),
    }


def check_endpoint(endpoint: str, what: str) -> str:
    """``endpoint`` if it looks like ``host:port`` (or ``unix:path``), else ``ValueError``."""
    if not isinstance(endpoint, str) or not _ENDPOINT.fullmatch(endpoint):
        raise ValueError(f"{what}: {endpoint!r} is not host:port")
    return endpoint


class EndpointResolver:
    """Maps a full gRPC service name to the ``host:port`` of its reflection service."""

    def __init__(self, static: Mapping[str, str] | None = None, template: str | None = None,
                 default: str | None = None) -> None:
        self.static: dict[str, str] = {}
        for key, endpoint in (static or {}).items():
            prefix = key.strip()
            if not SERVICE_NAME.fullmatch(prefix):
                raise ValueError(f"reflection endpoint map: {key!r} is not a service or package name")
            self.static[prefix] = check_endpoint(endpoint, f"reflection endpoint map entry {key!r}")
        if template is not None:
            try:
                sample = template.format_map(placeholders("pkg.v1.Sample"))
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"reflection endpoint template {template!r}: unknown or bad placeholder "
                                 f"{e}; known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}") from None
            check_endpoint(sample, f"reflection endpoint template {template!r}")
        self.template = template
        self.default = check_endpoint(default, "default reflection endpoint") if default else None

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> EndpointResolver:
        """From a mapping with optional keys ``static`` (a mapping), ``template``, ``default``."""
        unknown = set(config) - {"static", "template", "default"}
        if unknown:
            raise ValueError(f"reflection endpoints: unknown key(s) {sorted(unknown)}; "
                             "expected static, template, default")
        static = config.get("static") or {}
        if not isinstance(static, Mapping):
            raise ValueError("reflection endpoints: static must be a mapping of name -> host:port")
        return cls(static, config.get("template"), config.get("default"))  # type: ignore[arg-type]

    def resolve(self, service: str) -> str:
        """The reflection endpoint for ``service``; :class:`UnknownService` when none applies."""
        if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service) or "." not in service:
            raise UnknownService(f"{service!r} is not a fully-qualified gRPC service name")
        if service in self.static:
            return self.static[service]
        package = service
        while "." in package:
            package = package.rpartition(".")[0]
            if package in self.static:
                return self.static[package]
        if self.template is not None:
            return self.template.format_map(placeholders(service))
        if self.default is not None:
            return self.default
        raise UnknownService(f"no reflection endpoint is configured for service {service}")
