"""What the reflection cache hands to the ext_authz server: per-service option maps.

Pinned for the other packages: ``ModeSource.get(service)`` returns ``ServiceModes`` or raises
one of the errors below. None of them may ever be turned into an allow by a caller.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

from policy import Mode, resolve_mode


class ReflectionError(Exception):
    """Base class: the mode of a method could not be learned. Callers fail closed."""

    code = "reflection_error"


class UnknownService(ReflectionError):
    """The service's reflection endpoint does not know this service (or none is configured)."""

    code = "unknown_service"


class UnknownMethod(ReflectionError):
    """The service exists but has no such method."""

    code = "unknown_method"


class ReflectionUnavailable(ReflectionError):
    """Reflection could not be reached, timed out, or answered with an error."""

    code = "reflection_unavailable"


class MalformedDescriptors(ReflectionError):
    """Reflection answered with descriptors that do not parse or do not link."""

    code = "malformed_descriptors"


#: The (mode, source) answers, each held once for every service.
_ANSWERS: dict[tuple[Mode, str], tuple[Mode, str]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceModes:
    """The humans_who_can_rpc options of one service, as declared (not yet defaulted).

    ``methods`` maps each method name to its own option (None when unset);
    ``service_default`` is the service-level option (None when unset). Both are read once,
    when the object is made (``mode_for`` answers from that reading: one dictionary lookup
    on the hot path).
    """

    service: str
    methods: Mapping[str, Mode | None]
    service_default: Mode | None = None
    #: method -> (mode, source) when the method or the service says; None: the default applies.
    _resolved: dict[str, tuple[Mode, str] | None] = dataclasses.field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        resolved: dict[str, tuple[Mode, str] | None] = {}
        for method, option in self.methods.items():
            try:
                found = resolve_mode(option, self.service_default, Mode.UNSPECIFIED)
            except ValueError:  # neither says anything: the caller's default applies
                resolved[method] = None
            else:  # one shared tuple per answer: less memory for a warm check to touch
                resolved[method] = _ANSWERS.setdefault(found, found)
        object.__setattr__(self, "_resolved", resolved)

    def answers(self) -> Mapping[str, tuple[Mode, str] | None]:
        """Each method's (mode, source) as ``mode_for`` answers it; None where neither the
        method nor the service says anything (the caller's default applies). Read-only."""
        return self._resolved

    def mode_for(self, method: str, default: Mode) -> tuple[Mode, str]:
        """The mode that applies to ``method`` and its source ("method", "service", "default")."""
        try:
            found = self._resolved[method]
        except KeyError:
            raise UnknownMethod(f"{self.service} has no method {method!r}") from None
        if found is not None:
            return found
        return resolve_mode(None, None, default)


class ModeSource(Protocol):
    """Anything that can tell the options of a service: the reflection cache, or a test double."""

    async def get(self, service: str) -> ServiceModes:
        """Options of ``service``; raises a ``ReflectionError`` subclass when it cannot."""
        ...
