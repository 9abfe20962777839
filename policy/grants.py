"""An immutable, indexed snapshot of role grants for the hot path."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime

from .model import Grant, Role


class GrantSet:
    """Grants indexed by principal. Lookups take ``now`` so expiry needs no refresh."""

    __slots__ = ("_by_principal", "_grants", "revision")

    def __init__(self, grants: Iterable[Grant] = (), revision: int = 0) -> None:
        self._grants = tuple(grants)
        index: dict[str, dict[tuple[Role, str], Grant]] = defaultdict(dict)
        for g in self._grants:
            key = (g.role, g.service or "")
            held = index[g.principal].get(key)
            # Two grants for the same role: the longer-lived one counts.
            if held is None or _later(g.expires_at, held.expires_at):
                index[g.principal][key] = g
        self._by_principal = dict(index)
        self.revision = revision

    def __iter__(self) -> Iterator[Grant]:
        return iter(self._grants)

    def __len__(self) -> int:
        return len(self._grants)

    def has(self, principal: str, role: Role, now: datetime, service: str | None = None) -> bool:
        """True when ``principal`` holds an unexpired ``role`` (of ``service`` for contributors)."""
        grant = self._by_principal.get(principal, {}).get((role, service or ""))
        return grant is not None and grant.active(now)

    def is_engineer(self, principal: str, now: datetime) -> bool:
        return self.has(principal, Role.ENGINEER, now)

    def is_contributor(self, principal: str, service: str, now: datetime) -> bool:
        return self.has(principal, Role.CONTRIBUTOR, now, service)

    def is_security_oncall(self, principal: str, now: datetime) -> bool:
        return self.has(principal, Role.SECURITY_ONCALL, now)

    def roles_of(self, principal: str, now: datetime) -> list[Grant]:
        """The principal's active grants, for display."""
        return [g for g in self._by_principal.get(principal, {}).values() if g.active(now)]


def _later(a: datetime | None, b: datetime | None) -> bool:
    if a is None:
        return b is not None
    return b is not None and a > b
