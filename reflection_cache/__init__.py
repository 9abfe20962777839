"""Reads humans_who_can_rpc options from services through gRPC server reflection, cached."""
from .types import (MalformedDescriptors, ModeSource, ReflectionError, ReflectionUnavailable,
                    ServiceModes, UnknownMethod, UnknownService)

__all__ = ["MalformedDescriptors", "ModeSource", "ReflectionError", "ReflectionUnavailable",
           "ServiceModes", "UnknownMethod", "UnknownService"]
