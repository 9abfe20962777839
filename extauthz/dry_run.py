"""Dry-run (shadow) rollout: decide and record as usual, but let the call through.

A service is put in dry-run from the services catalog (``dry_run: true``); Envoy then sends
``dry_run: "true"`` in the CheckRequest's ``context_extensions`` for its routes (set by the
route, so a caller cannot forge it). The ext_authz server computes the real decision, and
``shadow_label`` says what the gateway does with it:

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

from collections.abc import Mapping

from policy.rules import Rule

#: The context_extensions key Envoy sends (see owners/envoy_render.py).
CONTEXT_KEY = "dry_run"

#: What a refusal let through is labelled, and the rule the gateway's answer names.
_SHADOW = {"deny": "would_deny", "approval_required": "would_need_approval"}
SHADOW_RULES: Mapping[str, Rule] = {"would_deny": Rule.DRY_RUN_WOULD_DENY,
                                    "would_need_approval": Rule.DRY_RUN_WOULD_NEED_APPROVAL}


def dry_run_requested(context_extensions: Mapping[str, str] | None) -> bool:
    """True only for the exact value ``"true"``: a typo must never switch enforcement off."""
    return context_extensions is not None and context_extensions.get(CONTEXT_KEY) == "true"


def shadow_label(outcome: str, dry_run: bool, rule: Rule | str | None = None) -> str | None:
    """``would_deny`` / ``would_need_approval`` when dry-run lets this outcome through, else None.

    ``outcome`` is an outcome's value (``deny``, ``approval_required``, ``allow``, ``error``);
    ``rule`` the rule that decided it (rules ``enforced_in_dry_run`` stay enforced).
    """
    if not dry_run or (rule and Rule(rule).enforced_in_dry_run):
        return None
    return _SHADOW.get(outcome)
