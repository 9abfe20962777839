"""What changed in the grants between two store revisions: the delta stream.

Every transaction that changes grants bumps the store's grants revision by one and records
its changes (``put``: the grant as it now is; ``delete``: the grant that went away). A
``GrantDelta`` carries the changes that take the grants from revision ``since`` to
``revision``, in order; caches apply it to the ``GrantSet`` they hold at ``since``
(``GrantSet.apply``). One grant change is one entry of a few dozen bytes on the wire
(``to_json``), which is what PostgreSQL NOTIFY payloads carry and what a later
Envoy-native fast path can push as is.

``changes is None`` means "the grants moved to ``revision`` but what changed was not
carried" (a batch too big for a NOTIFY payload, a poll that only saw the revision move, a
listener that reconnected): the receiver fetches the changes from the store's change log
(``Store.grant_changes_since``) or, if the log no longer reaches back, reloads everything.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .model import Grant, Role


@dataclasses.dataclass(frozen=True, slots=True)
class GrantChange:
    """One grant put (inserted or replaced) or deleted."""

    grant: Grant
    deleted: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class GrantDelta:
    """The changes from grants revision ``since`` to ``revision`` (``None``: not carried)."""

    since: int
    revision: int
    changes: tuple[GrantChange, ...] | None = ()

    def __post_init__(self) -> None:
        if self.revision < self.since:
            raise ValueError(f"grant delta goes backwards: {self.since} -> {self.revision}")

    @classmethod
    def of(cls, since: int, revision: int, changes: Sequence[GrantChange] | None) -> GrantDelta:
        return cls(since, revision, None if changes is None else tuple(changes))

    def to_json(self) -> str:
        """Compact wire form: ``{"s": since, "r": revision, "c": [["+"|"-", principal, role,
        service, expires_at|null, source], ...]}`` (``"c"`` absent when not carried)."""
        doc: dict[str, Any] = {"s": self.since, "r": self.revision}
        if self.changes is not None:
            doc["c"] = [["-" if c.deleted else "+", c.grant.principal, c.grant.role.value,
                         c.grant.service or "",
                         None if c.grant.expires_at is None else c.grant.expires_at.isoformat(),
                         c.grant.source] for c in self.changes]
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GrantDelta:
        """Parse ``to_json``'s form; a bare integer (an older writer's NOTIFY payload) is a
        revision with the changes not carried. Raises ``ValueError`` on anything else."""
        try:
            doc = json.loads(text)
            if isinstance(doc, int) and not isinstance(doc, bool):
                return cls(doc - 1 if doc > 0 else 0, doc, None)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            since, revision = int(doc["s"]), int(doc["r"])
            if "c" not in doc:
                return cls(since, revision, None)
            changes = []
            for op, principal, role, service, expires_at, source in doc["c"]:
                if op not in ("+", "-"):
                    raise ValueError(f"unknown op {op!r}")
                grant = Grant(principal, Role(role), service or None,
                              None if expires_at is None else datetime.fromisoformat(expires_at),
                              source)
                changes.append(GrantChange(grant, deleted=op == "-"))
            return cls(since, revision, tuple(changes))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"malformed grant delta {text[:80]!r}: {e}") from None
