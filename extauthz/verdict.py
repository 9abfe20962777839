"""What the pipeline concluded for one request, before it becomes an Envoy response."""
from __future__ import annotations

import dataclasses
import enum

from policy import Mode, Target


class Kind(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"
    #: We could not decide (a dependency failed or timed out): HTTP 503, never an allow.
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One decision: its outcome, the rule that made it, and what the caller is told.

    ``message`` says what happened; ``advice`` says what to do about it.
    """

    kind: Kind
    decision_id: str
    rule: str
    message: str
    advice: str = ""
    principal: str | None = None
    target: Target | None = None
    mode: Mode | None = None
    mode_source: str | None = None
    approval_id: str | None = None
    request_id: str | None = None
    request_url: str | None = None
    dev: bool = False
    #: Dry-run rollout (extauthz/dry_run.py): the route asked for it, and the label
    #: (would_deny / would_need_approval) when it let a refused call through.
    dry_run: bool = False
    shadow: str | None = None

    @property
    def allowed(self) -> bool:
        return self.kind is Kind.ALLOW

    @property
    def mode_name(self) -> str:
        return self.mode.name if self.mode is not None else "-"
