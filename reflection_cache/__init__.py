"""Reads humans_who_can_rpc options from services through gRPC server reflection, cached.

``ReflectionCache`` (cache.py) is the ``ModeSource`` the ext_authz server uses;
``ReflectionClient`` (client.py) does one fetch; ``EndpointResolver`` (endpoints.py) says
where each service's reflection lives; ``server.py`` serves reflection v1 and v1alpha.
"""
from .types import (
    MalformedDescriptors,
    ModeSource,
    ReflectionError,
    ReflectionUnavailable,
    ServiceModes,
    UnknownMethod,
    UnknownService,
)

__all__ = ["CacheSettings", "EndpointResolver", "MalformedDescriptors", "ModeSource",
           "ReflectionCache", "ReflectionClient", "ReflectionError", "ReflectionUnavailable",
           "ServiceModes", "UnknownMethod", "UnknownService"]


def __getattr__(name: str):
    # Imported lazily so `import reflection_cache` (for the types) does not pull in grpc.
    if name in ("CacheSettings", "ReflectionCache"):
        from . import cache
        return getattr(cache, name)
    if name == "ReflectionClient":
        from .client import ReflectionClient
        return ReflectionClient
    if name == "EndpointResolver":
        from .endpoints import EndpointResolver
        return EndpointResolver
    raise AttributeError(f"module 'reflection_cache' has no attribute {name!r}")
