"""Dry-run (shadow) rollout: decide and record as usual, but let the call through.

A service is put in dry-run from the services catalog (``dry_run: true``); Envoy then sends
``dry_run: "true"`` in the CheckRequest's ``context_extensions`` for its routes (set by the
route, so a caller cannot forge it). The ext_authz server computes the real decision, and
``apply_dry_run`` maps it to what the gateway does:

=================== ============ =============================== ========================
decided             dry_run      gateway answers                 shadow label
=================== ============ =============================== ========================
allow               any          allow                           -
deny                true         allow                           would_deny
approval_required   true         allow                           would_need_approval
deny / approval     false        as decided                      -
=================== ============ =============================== ========================

Failures to decide (reflection or store unreachable) are *not* decisions and are not
relaxed by dry-run: they stay errors (503 -> gRPC UNAVAILABLE). Nor is a caller whose
identity could not be established (rules ``identity.*``): dry-run relaxes policy, never
who is calling or whether the checks can run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from policy import Decision, Outcome

#: The context_extensions key Envoy sends (see owners/envoy_render.py).
CONTEXT_KEY = "dry_run"
#: Header added to a dry-run call's response so the caller sees it was not enforced.
RESPONSE_HEADER = "x-rpcauthz-dry-run"

_SHADOW = {Outcome.DENY.value: "would_deny", Outcome.APPROVAL_REQUIRED.value: "would_need_approval"}
#: Rules that stay enforced in dry-run.
ENFORCED_RULE_PREFIXES = ("identity.",)


def dry_run_requested(context_extensions: Mapping[str, str] | None) -> bool:
    """True only for the exact value ``"true"``: a typo must never switch enforcement off."""
    return bool(context_extensions) and context_extensions.get(CONTEXT_KEY) == "true"


@dataclasses.dataclass(frozen=True)
class Effective:
    """What the gateway does with a decision, and how to label it in logs and metrics."""

    outcome: Outcome          # what the caller gets
    decided: Outcome          # what the policy said
    dry_run: bool
    shadow: str | None        # "would_deny" / "would_need_approval" when dry-run let it through

    @property
    def labels(self) -> dict[str, str]:
        """Metric labels: the same keys on every decision so dashboards can split by them."""
        return {"outcome": self.outcome.value, "decided": self.decided.value,
                "dry_run": "true" if self.dry_run else "false", "shadow": self.shadow or "none"}

    @property
    def log_fields(self) -> dict[str, object]:
        """Fields for the decision's log line and audit detail."""
        return {"dry_run": self.dry_run, "decided": self.decided.value,
                "enforced": self.outcome.value, "shadow": self.shadow}


def shadow_label(outcome: str, dry_run: bool, rule: str = "") -> str | None:
    """``would_deny`` / ``would_need_approval`` when dry-run lets this outcome through, else None.

    ``outcome`` is an outcome's value (``deny``, ``approval_required``, ``allow``, ``error``).
    """
    if not dry_run or rule.startswith(ENFORCED_RULE_PREFIXES):
        return None
    return _SHADOW.get(outcome)


def apply_dry_run(decision: Decision, dry_run: bool) -> Effective:
    """Map a policy decision to the gateway's answer (see the module's table)."""
    shadow = shadow_label(decision.outcome.value, dry_run, decision.rule)
    outcome = Outcome.ALLOW if shadow else decision.outcome
    return Effective(outcome=outcome, decided=decision.outcome, dry_run=dry_run, shadow=shadow)
