"""Reflection settings shared by every server that reads modes through reflection.

One pydantic model (on :mod:`rpcauthz.settings`) for the ``reflection:`` section of the ext_authz
server's and the approvals server's configuration, and for ``ReflectionCache.from_config``::

    reflection:
      endpoints: {static: {payments: payments-reflection.internal:50051}, template: ..., default: ...}
      cache: {ttl: 60, stale_window: 120, negative_ttl: 5, error_backoff: 1, max_entries: 10000,
              deadline: 0.5, channel_idle_timeout: 0.5}
      tls: {ca_file: /etc/rpcauthz/ca.pem, cert_file: ..., key_file: ..., server_name: ...}
      tls_by_endpoint:
        "127.0.0.1:50061": {plaintext: true}

``tls`` applies to every endpoint, ``tls_by_endpoint`` (keyed by the ``host:port`` an endpoint
resolves to) overrides it for one. Plaintext must be explicit (``plaintext: true``) for any
endpoint that is not on this machine (``127.0.0.1``, ``[::1]``, ``localhost``, ``unix:``):
a missing ``tls`` section is refused for such endpoints rather than silently dialled in clear.
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, model_validator

from rpcauthz.settings import Section, describe

from .endpoints import EndpointResolver, placeholders

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_DEADLINE = 0.5


class Endpoints(Section):
    """Where each service's reflection service is reached (first match wins).

    ``static`` maps a full service name or a package prefix to ``host:port``; ``template``
    builds one from the name (placeholders such as ``{service}``, ``{name_lower}``; see
    reflection_cache/endpoints.py); ``default`` is the fallback. With none, every service
    is unknown (and so denied).
    """

    static: dict[str, str] = Field(default_factory=dict)
    template: str | None = None
    default: str | None = None

    @model_validator(mode="after")
    def _resolvable(self) -> Endpoints:
        self.resolver()  # refuses bad names, endpoints and templates by name
        return self

    def resolver(self) -> EndpointResolver:
        """The resolver these settings describe."""
        return EndpointResolver(self.static, self.template, self.default)

    def configured(self) -> list[str]:
        """Every endpoint named (a template as its rendering for a sample service)."""
        out = list(self.static.values())
        if self.template:
            out.append(self.template.format_map(placeholders("pkg.v1.Sample")))
        if self.default:
            out.append(self.default)
        return out


class CacheSettings(Section):
    """The reflection cache (seconds); see reflection_cache/cache.py."""

    #: Fresh for this long after a fetch.
    ttl: float = Field(60.0, gt=0)
    #: Then served stale (while one refresh runs) for this long.
    stale_window: float = Field(120.0, ge=0)
    #: "No such service" is remembered this long.
    negative_ttl: float = Field(5.0, ge=0)
    #: Other failures are remembered (and refreshes spaced) this long.
    error_backoff: float = Field(1.0, ge=0)
    max_entries: int = Field(10_000, ge=1)
    #: Bound of one reflection fetch; keep it below the gateway's decision_deadline_ms.
    deadline: float = Field(DEFAULT_DEADLINE, gt=0)
    #: A reflection channel idle this long is closed (null: kept); memory vs a dial per
    #: refresh, see docs/reflection.md.
    channel_idle_timeout: float | None = Field(0.5, gt=0)

    @classmethod
    def from_mapping(cls, config: Mapping[str, object]) -> CacheSettings:
        """From a config mapping (e.g. parsed YAML); unknown keys and bad values raise
        ``ValueError`` naming the key."""
        try:
            return cls.model_validate(dict(config))
        except ValidationError as e:
            raise ValueError(describe(e, component="reflection cache")) from None


class Tls(Section):
    """How to dial a reflection endpoint: TLS (the default once a ``tls`` section exists) or,
    explicitly, plaintext.

    ``ca_file`` (PEM) is trusted instead of the system roots; ``cert_file``/``key_file``
    (PEM, both or neither) are presented for mutual TLS; ``server_name`` overrides the name
    checked against the server's certificate (when endpoints are addressed by IP). The files
    are read when the cache is built (server start); one that cannot be read stops it, named.
    """

    plaintext: bool = False
    ca_file: pathlib.Path | None = None
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Tls:
        if self.plaintext and (self.ca_file or self.cert_file or self.key_file or self.server_name):
            raise ValueError("plaintext: true cannot go with ca_file, cert_file, key_file or server_name")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return self


class ReflectionSettings(Section):
    """The ``reflection:`` section: endpoints, cache, TLS."""

    endpoints: Endpoints = Endpoints()
    cache: CacheSettings = CacheSettings()
    #: For every endpoint; without it, endpoints on this machine are dialled in plaintext and
    #: any other endpoint is refused (say ``tls: {plaintext: true}`` to allow it).
    tls: Tls | None = None
    #: Per ``host:port``: overrides ``tls`` for that endpoint.
    tls_by_endpoint: dict[str, Tls] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            moved = sorted(set(data) & set(CacheSettings.model_fields))
            if moved:
                raise ValueError(f"reflection.{moved[0]} is now reflection.cache.{moved[0]} "
                                 f"(the cache settings moved under cache:)")
        return data

    @model_validator(mode="after")
    def _plaintext_is_explicit(self) -> ReflectionSettings:
        if self.tls is None:
            remote = [e for e in self.endpoints.configured()
                      if not is_loopback(e) and e not in self.tls_by_endpoint]
            if remote:
                raise ValueError(f"reflection endpoint {remote[0]} is not on this machine: configure "
                                 "reflection.tls (or tls: {plaintext: true} to dial in clear)")
        return self

    def tls_for(self, endpoint: str | None) -> Tls | None:
        """How ``endpoint`` is dialled (None: plaintext); ``None`` asks for the default."""
        tls = self.tls if endpoint is None else self.tls_by_endpoint.get(endpoint, self.tls)
        return None if tls is None or tls.plaintext else tls


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` (``host:port`` or ``unix:path``) is on this machine."""
    return endpoint.startswith("unix:") or endpoint.rpartition(":")[0] in LOOPBACK_HOSTS
