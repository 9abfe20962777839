"""Audit events: what happened, who did it, when, why, and what was decided."""
from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any

#: The kinds of event the system writes. Stable strings: dashboards key on them.
KINDS = frozenset({
    "request.created", "request.completed", "request.narrowed", "request.approved", "request.approval_recorded",
    "request.rejected", "request.cancelled", "request.expired", "request.used",
    "request.use_voided",
    "decision.allow", "decision.allow_with_approval", "decision.deny",
    "decision.approval_required", "decision.error", "break_glass.used",
    "grant.added", "grant.removed",
    "credential.requested", "credential.approved", "credential.fetched",
})


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record. ``detail`` holds kind-specific fields (never secrets or payloads)."""

    kind: str
    actor: str
    at: datetime
    request_id: str | None = None
    service: str | None = None
    method: str | None = None
    outcome: str | None = None
    reason: str = ""
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    trace_id: str | None = None
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown audit event kind {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times as RFC 3339 strings)."""
        d = dataclasses.asdict(self)
        d["at"] = self.at.isoformat()
        return d
