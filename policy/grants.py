"""An immutable, indexed snapshot of role grants for the hot path.

The index holds only strings, ``datetime`` values and tuples of them (no ``Grant`` or
enum objects), and identical entries are shared: a 10,000-engineer organisation's grants
are a few MB, and once the collector has looked at them once it untracks them, so full
garbage collections do not grow with the number of grants.

Three flat dictionaries, one per kind of question, each hot-path question (``is_engineer``,
``is_contributor``, ``has``, ...) answered with one lookup: the engineer role keyed by the
principal alone (every check asks it), contributors keyed ``(principal, service)``, and the
other roles keyed ``(principal, role)``. A nested index (principal, then that principal's
own small dictionary) touches about twice the memory per question, and with 10,000
principals that memory is not in the CPU's caches: it made a warm check ~0.4 µs slower at
the large size than at the demo's, and held ~2 MB more. One table of every grant keyed
``(principal, role, service)`` (as before) held each engineer twice and a 3-tuple per
grant: ~1.5 MB more at 30,000 grants, and a contributor question probed a 4x larger table.
``roles_of`` (the approvals pages) groups by principal once per GrantSet, on first use.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .model import Grant, Role

if TYPE_CHECKING:
    from .grant_delta import GrantDelta

#: (expires_at, source)
_Entry = tuple[datetime | None, str]
_ENGINEER = Role.ENGINEER
_CONTRIBUTOR = Role.CONTRIBUTOR
_ONCALL_ROLE = Role.SECURITY_ONCALL.value
_ROLE_VALUE = {r: r.value for r in Role}


class _Interner:
    """Shares equal entries between grants (and between successive GrantSets)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[_Entry, _Entry] = {}

    def entry(self, expires_at: datetime | None, source: str) -> _Entry:
        e = (expires_at, source)
        if expires_at is not None:  # distinct expiry times would grow the table forever
            return e
        return self.entries.setdefault(e, e)


class _Tables:
    """The three indexes of one GrantSet, while it is built."""

    __slots__ = ("engineers", "contributors", "others")

    def __init__(self, engineers: dict[str, _Entry], contributors: dict[tuple[str, str], _Entry],
                 others: dict[tuple[str, str], _Entry]) -> None:
        self.engineers, self.contributors, self.others = engineers, contributors, others

    def table_and_key(self, g: Grant) -> tuple[dict[Any, _Entry], Any]:
        if g.role is _ENGINEER:
            return self.engineers, g.principal
        if g.role is _CONTRIBUTOR:
            return self.contributors, (g.principal, g.service or "")
        return self.others, (g.principal, _ROLE_VALUE[g.role])


class GrantSet:
    """Grants indexed for lookups. Lookups take ``now`` so expiry needs no refresh."""

    __slots__ = ("_engineers", "_contributors", "_others", "_by_principal", "_interner", "revision")

    def __init__(self, grants: Iterable[Grant] = (), revision: int = 0) -> None:
        interner = _Interner()
        tables = _Tables({}, {}, {})
        for g in grants:
            table, key = tables.table_and_key(g)
            held = table.get(key)
            # Two grants for the same role: the longer-lived one counts.
            if held is None or _later(g.expires_at, held[0]):
                table[key] = interner.entry(g.expires_at, g.source)
        self._engineers, self._contributors, self._others = tables.engineers, tables.contributors, tables.others
        self._by_principal: dict[str, list[tuple[tuple[str, str, str], _Entry]]] | None = None
        self._interner = interner
        self.revision = revision

    def apply(self, delta: GrantDelta) -> GrantSet:
        """A new GrantSet at ``delta.revision``: this one with ``delta``'s changes applied.

        Costs a copy of the indexes (pointers only) plus the changed entries; this
        GrantSet is left as it was, so readers holding it are unaffected. Raises
        ``ValueError`` if ``delta`` does not start at this set's revision or does not
        carry its changes.
        """
        if delta.changes is None:
            raise ValueError(f"grant delta {delta.since}->{delta.revision} does not carry its changes")
        if delta.since != self.revision:
            raise ValueError(f"grant delta starts at revision {delta.since}, "
                             f"these grants are at {self.revision}")
        tables = _Tables(dict(self._engineers), dict(self._contributors), dict(self._others))
        interner = self._interner
        for change in delta.changes:
            table, key = tables.table_and_key(change.grant)
            if change.deleted:
                table.pop(key, None)
            else:
                table[key] = interner.entry(change.grant.expires_at, change.grant.source)
        gs = GrantSet.__new__(GrantSet)
        gs._engineers, gs._contributors, gs._others = tables.engineers, tables.contributors, tables.others
        gs._by_principal, gs._interner, gs.revision = None, interner, delta.revision
        return gs

    def _keyed(self) -> Iterator[tuple[tuple[str, str, str], _Entry]]:
        """Every grant as ((principal, role value, service or ""), entry), unordered."""
        engineer, contributor = _ENGINEER.value, _CONTRIBUTOR.value
        for principal, entry in self._engineers.items():
            yield (principal, engineer, ""), entry
        for (principal, service), entry in self._contributors.items():
            yield (principal, contributor, service), entry
        for (principal, role), entry in self._others.items():
            yield (principal, role, ""), entry

    def __iter__(self) -> Iterator[Grant]:
        """Every grant, ordered by (principal, role, service)."""
        for (principal, role, service), (expires_at, source) in sorted(self._keyed()):
            yield Grant(principal, Role(role), service or None, expires_at, source)

    def __len__(self) -> int:
        return len(self._engineers) + len(self._contributors) + len(self._others)

    def has(self, principal: str, role: Role, now: datetime, service: str | None = None) -> bool:
        """True when ``principal`` holds an unexpired ``role`` (of ``service`` for contributors)."""
        if role is _ENGINEER:
            entry = None if service else self._engineers.get(principal)
        elif role is _CONTRIBUTOR:
            entry = self._contributors.get((principal, service or ""))
        else:
            entry = None if service else self._others.get((principal, _ROLE_VALUE[role]))
        return entry is not None and (entry[0] is None or now < entry[0])

    def is_engineer(self, principal: str, now: datetime) -> bool:
        entry = self._engineers.get(principal)
        return entry is not None and (entry[0] is None or now < entry[0])

    def is_contributor(self, principal: str, service: str, now: datetime) -> bool:
        entry = self._contributors.get((principal, service))
        return entry is not None and (entry[0] is None or now < entry[0])

    def is_security_oncall(self, principal: str, now: datetime) -> bool:
        entry = self._others.get((principal, _ONCALL_ROLE))
        return entry is not None and (entry[0] is None or now < entry[0])

    def roles_of(self, principal: str, now: datetime) -> list[Grant]:
        """The principal's active grants, for display."""
        if self._by_principal is None:  # built once per GrantSet, by whoever asks first
            by_principal: dict[str, list[tuple[tuple[str, str, str], _Entry]]] = {}
            for key, entry in sorted(self._keyed()):
                by_principal.setdefault(key[0], []).append((key, entry))
            self._by_principal = by_principal
        out = []
        for (_, role, service), (expires_at, source) in self._by_principal.get(principal, ()):
            if expires_at is None or now < expires_at:
                out.append(Grant(principal, Role(role), service or None, expires_at, source))
        return out


def _later(a: datetime | None, b: datetime | None) -> bool:
    if a is None:
        return b is not None
    return b is not None and a > b
