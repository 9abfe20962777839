"""What the pipeline concluded for one request, before it becomes an Envoy response."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from policy import Mode, Target
from policy.rules import Rule, explain, message


class Kind(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"
    #: We could not decide (a dependency failed or timed out): HTTP 503, never an allow.
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One decision: its outcome, the registered rule that made it, and its facts.

    ``message`` (what happened) and ``advice`` (what to do about it) are worded from
    ``rule`` and ``facts`` by ``policy.rules``, the one place wording lives; the verdict's
    own principal, target, mode, decision and request ids are facts too.
    """

    kind: Kind
    decision_id: str
    rule: Rule
    facts: Mapping[str, object] = dataclasses.field(default_factory=dict)
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

    def facts_for_words(self) -> dict[str, object]:
        """The verdict's own fields that wording may name, then its ``facts``."""
        facts: dict[str, object] = {"decision_id": self.decision_id}
        if self.principal is not None:
            facts["principal"] = self.principal
        if self.target is not None:
            facts["target"] = self.target
        if self.mode is not None:
            facts["mode"] = self.mode
        if self.request_id is not None:
            facts["request_id"] = self.request_id
        facts.update(self.facts)
        return facts

    def explained(self) -> tuple[str, str]:
        """``(message, advice)`` for this verdict."""
        return explain(self.rule, self.facts_for_words())

    @property
    def message(self) -> str:
        """What happened (for the caller and the audit event's reason)."""
        return message(self.rule, self.facts_for_words())

    @property
    def advice(self) -> str:
        """What the caller can do about it ("" when nothing)."""
        return self.explained()[1]
