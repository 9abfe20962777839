"""The dry-run mapping: decisions are kept and labelled, only the enforcement changes."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from extauthz.dry_run import SHADOW_RULES, dry_run_requested, shadow_label
from policy import Grant, GrantSet, Mode, Outcome, Role, Target, decide
from policy.rules import Rule

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GRANTS = GrantSet([Grant("alice", Role.ENGINEER)])
T = Target("acme.v1.Billing", "Refund")


@pytest.mark.parametrize("mode, decided, dry, shadow", [
    (Mode.ENGINEERS_WITHOUT_APPROVAL, Outcome.ALLOW, True, None),
    (Mode.ENGINEERS_WITH_APPROVAL, Outcome.APPROVAL_REQUIRED, True, "would_need_approval"),
    (Mode.CONTRIBUTORS_WITHOUT_APPROVAL, Outcome.DENY, True, "would_deny"),
    (Mode.ENGINEERS_WITH_APPROVAL, Outcome.APPROVAL_REQUIRED, False, None),
    (Mode.CONTRIBUTORS_WITHOUT_APPROVAL, Outcome.DENY, False, None),
])
def test_real_decisions_mapped(mode, decided, dry, shadow):
    d = decide("alice", T, mode, GRANTS, (), NOW)
    assert d.outcome is decided
    assert shadow_label(d.outcome.value, dry, d.rule) == shadow
    if shadow:
        assert SHADOW_RULES[shadow].value == f"dry_run.{shadow}"


def test_only_exact_true_turns_enforcement_off():
    assert dry_run_requested({"dry_run": "true"})
    for ctx in (None, {}, {"dry_run": "True"}, {"dry_run": "yes"}, {"dry_run": "1"}, {"dryrun": "true"}):
        assert not dry_run_requested(ctx)


def test_errors_and_identity_failures_stay_enforced():
    assert shadow_label("error", True) is None
    assert shadow_label("allow", True) is None
    assert shadow_label("deny", True, Rule.IDENTITY_UNVERIFIED) is None
    assert shadow_label("deny", True, "identity.unverified") is None
    assert shadow_label("deny", True, Rule.TARGET_UNKNOWN_SERVICE) == "would_deny"
    assert shadow_label("approval_required", True) == "would_need_approval"
    assert shadow_label("deny", False) is None


def test_unresolvable_mode_still_labelled():
    d = decide("alice", T, Mode.UNSPECIFIED, GRANTS, (), NOW)
    assert d.rule is Rule.MODE_UNSPECIFIED
    assert shadow_label(d.outcome.value, False, d.rule) is None
    assert shadow_label(d.outcome.value, True, d.rule) == "would_deny"
