"""Small stand-ins for the ext_authz server's unit tests (the store itself is the real one).

``StaticModes`` is a ModeSource from a fixed map, with switches to make it fail or stall;
``FixedGrants`` serves a fixed GrantSet; ``DownStore`` is a store that cannot be reached.
The end-to-end tests use real reflection, real grant caches and real stores instead.
"""
from __future__ import annotations

import asyncio

from policy import GrantSet, StoreError
from reflection_cache.types import ReflectionError, ServiceModes, UnknownService


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

