"""An immutable, indexed snapshot of role grants for the hot path.

Three flat dictionaries, one per kind of question, each hot-path question (``is_engineer``,
``is_contributor``, ``has``, ...) answered with one lookup: the engineer role keyed by the
principal alone (every check asks it), contributors keyed ``"principal\0service"``, and the
other roles keyed ``"principal\0role"``. A nested index (principal, then that principal's
own small dictionary) touches about twice the memory per question, and with 10,000
principals that memory is not in the CPU's caches: it made a warm check ~0.4 µs slower at
the large size than at the demo's, and held ~2 MB more. ``roles_of`` (the approvals pages)
groups by principal once per GrantSet, on first use.

Keys are strings and values small ints (an index into the shared ``(expires_at, source)``
entries), so the tables hold nothing the garbage collector tracks: CPython never tracks a
dictionary of only strings and ints, so no collection ever walks them. With
``(principal, service)`` tuples as keys (as before), the first young collection after a
reload walked the ~20,000 new tuples and the table: a pause of 29-51 ms of every check at
30,000 grants in bench/scale_bench.py. A string key also compares as one string where a
tuple compared two, one memory read fewer per question. The NUL separator keeps the keys
unambiguous: a grant whose principal or service holds one is left out (no usable principal
or method's service can, policy/principals.py, policy.Target), and a question whose
principal holds one finds nothing.

The contributor table also holds one int key (``_HASH_IN_ENTRIES``), which no question can
ask (questions are strings) and which iteration and ``len`` skip. A dictionary of only
string keys keeps no hashes of its own: it reads each probed key object's cached hash, so
a question that finds nothing (most contributor questions: an engineer calling another
team's service) touches the memory of one or two unrelated keys. One non-string key makes
CPython keep each key's hash beside it in the table, so a miss compares hashes there and
touches no key object: at 10,000 engineers a warm check misses the last-level cache 4.0
times instead of 5.1 (``bench/warm_check_misses.py``, cachegrind). Hits gain nothing from
it (the key is compared either way), so the other two tables stay as they are.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from .model import Grant, Role

if TYPE_CHECKING:
    from .grant_delta import GrantDelta

#: (expires_at, source)
_Entry = tuple[datetime | None, str]
_ENGINEER = Role.ENGINEER
_CONTRIBUTOR = Role.CONTRIBUTOR
_ONCALL_ROLE = Role.SECURITY_ONCALL.value
_ROLE_VALUE = {r: r.value for r in Role}
#: Joins a principal and a service (or role) into one key; neither may hold it.
_SEP = "\0"
#: The contributor table's one non-string key (see the module's docstring).
_HASH_IN_ENTRIES = 0


class _Interner:
    """Numbers the distinct (expires_at, source) entries, shared between a GrantSet and
    the sets ``apply`` makes from it (a full load starts a new one, so entries of grants
    gone since are dropped there). Appending never moves an entry, so a set's numbers stay
    valid while a newer set adds to the same list. Locked: two sets made from one base at
    once must not give two entries one number."""

    __slots__ = ("entries", "_numbers", "_lock")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._numbers: dict[_Entry, int] = {}
        self._lock = threading.Lock()

    def number(self, expires_at: datetime | None, source: str) -> int:
        e = (expires_at, source)
        n = self._numbers.get(e)
        if n is None:
            with self._lock:
                n = self._numbers.get(e)
                if n is None:
                    self.entries.append(e)
                    n = self._numbers[e] = len(self.entries) - 1
        return n


class _Tables:
    """The three indexes of one GrantSet, while it is built."""

    __slots__ = ("engineers", "contributors", "others")

    def __init__(self, engineers: dict[str, int], contributors: dict[str | int, int],
                 others: dict[str, int]) -> None:
        self.engineers, self.contributors, self.others = engineers, contributors, others

    def table_and_key(self, g: Grant) -> tuple[dict[str, int] | dict[str | int, int], str] | None:
        """The table and key of ``g``; None when ``g`` cannot be keyed unambiguously (a NUL
        in its principal or service: no check can ask for it anyway)."""
        if _SEP in g.principal:
            return None
        if g.role is _ENGINEER:
            return self.engineers, g.principal
        if g.role is _CONTRIBUTOR:
            service = g.service or ""
            return (None if _SEP in service
                    else (self.contributors, f"{g.principal}{_SEP}{service}"))
        return self.others, f"{g.principal}{_SEP}{_ROLE_VALUE[g.role]}"


class GrantSet:
    """Grants indexed for lookups. Lookups take ``now`` so expiry needs no refresh."""

    __slots__ = ("_engineers", "_contributors", "_others", "_entries", "_by_principal", "_interner",
                 "revision")

    def __init__(self, grants: Iterable[Grant] = (), revision: int = 0) -> None:
        interner = _Interner()
        entries = interner.entries
        tables = _Tables({}, {_HASH_IN_ENTRIES: -1}, {})
        for g in grants:
            keyed = tables.table_and_key(g)
            if keyed is None:
                continue
            table, key = keyed
            held = table.get(key)
            # Two grants for the same role: the longer-lived one counts.
            if held is None or _later(g.expires_at, entries[held][0]):
                table[key] = interner.number(g.expires_at, g.source)
        self._engineers, self._contributors, self._others = tables.engineers, tables.contributors, tables.others
        self._entries = entries
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
            keyed = tables.table_and_key(change.grant)
            if keyed is None:
                continue
            table, key = keyed
            if change.deleted:
                table.pop(key, None)
            else:
                table[key] = interner.number(change.grant.expires_at, change.grant.source)
        gs = GrantSet.__new__(GrantSet)
        gs._engineers, gs._contributors, gs._others = tables.engineers, tables.contributors, tables.others
        gs._entries, gs._by_principal, gs._interner = interner.entries, None, interner
        gs.revision = delta.revision
        return gs

    def _keyed(self) -> Iterator[tuple[tuple[str, str, str], _Entry]]:
        """Every grant as ((principal, role value, service or ""), entry), unordered."""
        engineer, contributor, entries = _ENGINEER.value, _CONTRIBUTOR.value, self._entries
        for principal, n in self._engineers.items():
            yield (principal, engineer, ""), entries[n]
        for key, n in self._contributors.items():
            if type(key) is not str:  # _HASH_IN_ENTRIES
                continue
            principal, _, service = key.partition(_SEP)
            yield (principal, contributor, service), entries[n]
        for key, n in self._others.items():
            principal, _, role = key.partition(_SEP)
            yield (principal, role, ""), entries[n]

    def __iter__(self) -> Iterator[Grant]:
        """Every grant, ordered by (principal, role, service)."""
        for (principal, role, service), (expires_at, source) in sorted(self._keyed()):
            yield Grant(principal, Role(role), service or None, expires_at, source)

    def __len__(self) -> int:
        return len(self._engineers) + len(self._contributors) - 1 + len(self._others)  # - _HASH_IN_ENTRIES

    def _active(self, n: int | None, now: datetime) -> bool:
        if n is None:
            return False
        expires_at = self._entries[n][0]
        return expires_at is None or now < expires_at

    def has(self, principal: str, role: Role, now: datetime, service: str | None = None) -> bool:
        """True when ``principal`` holds an unexpired ``role`` (of ``service`` for contributors)."""
        if role is _ENGINEER:
            n = None if service else self._engineers.get(principal)
        elif role is _CONTRIBUTOR:
            n = self._contributors.get(f"{principal}{_SEP}{service or ''}")
        else:
            n = None if service else self._others.get(f"{principal}{_SEP}{_ROLE_VALUE[role]}")
        return self._active(n, now)

    def is_engineer(self, principal: str, now: datetime) -> bool:
        n = self._engineers.get(principal)
        if n is None:
            return False
        expires_at = self._entries[n][0]
        return expires_at is None or now < expires_at

    def is_contributor(self, principal: str, service: str, now: datetime) -> bool:
        n = self._contributors.get(f"{principal}{_SEP}{service}")
        if n is None:
            return False
        expires_at = self._entries[n][0]
        return expires_at is None or now < expires_at

    def is_security_oncall(self, principal: str, now: datetime) -> bool:
        return self._active(self._others.get(f"{principal}{_SEP}{_ONCALL_ROLE}"), now)

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
