"""Small stand-ins for the ext_authz server's unit tests (the store itself is the real one).

``StaticModes`` is a ModeSource from a fixed map, with switches to make it fail or stall;
``FixedGrants`` serves a fixed GrantSet; ``DownStore`` is a store that cannot be reached;
``check_request`` is the CheckRequest Envoy sends after jwt_authn verified a token (or, sent
straight to the port, a forged one).
The end-to-end tests use real reflection, real grant caches and real stores instead.
"""
from __future__ import annotations

import asyncio

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2

from policy import GrantSet, Mode, StoreError, Target
from reflection_cache.types import ReflectionError, ServiceModes, UnknownService


def check_request(path: str = "/rpcauthz.demo.v1.Accounts/ListAccounts",
                  principal: str = "alice") -> external_auth_pb2.CheckRequest:
    """A Check for ``path`` carrying ``{"sub": principal}`` as jwt_authn's payload."""
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.path = path
    req.attributes.request.http.method = "POST"
    s = struct_pb2.Struct()
    s.update({"jwt_payload": {"sub": principal}})
    req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(s)
    return req


class DownStore:
    """A store that is unreachable: every call raises ``StoreError``."""

    def __getattr__(self, name: str):
        def unreachable(*args, **kwargs):
            raise StoreError(f"store is down ({name}: connection refused)")
        return unreachable


class FixedGrants:
    def __init__(self, grants: GrantSet) -> None:
        self.grants = grants

    def current(self) -> GrantSet:
        return self.grants


class StaticModes:
    """A ModeSource from ``{service: ServiceModes}``; ``fail``/``delay`` simulate trouble."""

    def __init__(self, services: dict[str, ServiceModes]) -> None:
        self.services = services
        self.fail: ReflectionError | None = None
        self.delay = 0.0
        self.calls = 0

    async def get(self, service: str) -> ServiceModes:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        try:
            return self.services[service]
        except KeyError:
            raise UnknownService(f"no reflection knows {service}") from None



class FreshModes(StaticModes):
    """``StaticModes`` that also answers ``get_fresh`` (like a warm ``ReflectionCache``), so
    the pipeline takes its from-memory path; ``stale = True`` makes every entry not fresh."""

    def __init__(self, services: dict[str, ServiceModes]) -> None:
        super().__init__(services)
        self.stale = False
        self.fresh_calls = 0

    def get_fresh(self, service: str) -> ServiceModes | None:
        self.fresh_calls += 1
        if self.stale or self.delay or self.fail is not None:
            return None
        return self.services.get(service)


class PathModes(FreshModes):
    """``FreshModes`` that also answers ``fresh_target(path, default)`` from a flat
    ``/service/method`` index of ``ServiceModes.answers()`` (like a warm ``ReflectionCache``),
    so the pipeline takes its by-path step; None for unknown paths, as the cache does."""

    def __init__(self, services: dict[str, ServiceModes]) -> None:
        super().__init__(services)
        self.paths = {f"/{name}/{method}": answer for name, modes in services.items()
                      for method, answer in modes.answers().items()}
        self.path_calls = self.path_answers = 0

    def fresh_target(self, path: str, default: Mode) -> tuple[Target, tuple[Mode, str]] | None:
        self.path_calls += 1
        if self.stale or self.delay or self.fail is not None or path not in self.paths:
            return None
        self.path_answers += 1
        answer = self.paths[path]
        service, method = path[1:].split("/")
        return Target(service, method), (answer if answer is not None else (default, "default"))
