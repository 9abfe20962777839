"""The dry-run mapping: decisions are kept and labelled, only the enforcement changes."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from extauthz.dry_run import apply_dry_run, dry_run_requested
from policy import Decision, Grant, GrantSet, Mode, Outcome, Role, Target, decide

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GRANTS = GrantSet([Grant("alice", Role.ENGINEER)])
T = Target("acme.v1.Billing", "Refund")


@pytest.mark.parametrize("mode, decided, dry, enforced, shadow", [
    (Mode.ENGINEERS_WITHOUT_APPROVAL, Outcome.ALLOW, True, Outcome.ALLOW, None),
    (Mode.ENGINEERS_WITH_APPROVAL, Outcome.APPROVAL_REQUIRED, True, Outcome.ALLOW, "would_need_approval"),
    (Mode.CONTRIBUTORS_WITHOUT_APPROVAL, Outcome.DENY, True, Outcome.ALLOW, "would_deny"),
    (Mode.ENGINEERS_WITH_APPROVAL, Outcome.APPROVAL_REQUIRED, False, Outcome.APPROVAL_REQUIRED, None),
    (Mode.CONTRIBUTORS_WITHOUT_APPROVAL, Outcome.DENY, False, Outcome.DENY, None),
])
def test_real_decisions_mapped(mode, decided, dry, enforced, shadow):
    d = decide("alice", T, mode, GRANTS, (), NOW)
    assert d.outcome is decided
    eff = apply_dry_run(d, dry)
    assert (eff.outcome, eff.decided, eff.shadow, eff.dry_run) == (enforced, decided, shadow, dry)
    assert eff.labels == {"outcome": enforced.value, "decided": decided.value,
                          "dry_run": "true" if dry else "false", "shadow": shadow or "none"}
    assert eff.log_fields["decided"] == decided.value and eff.log_fields["dry_run"] is dry


def test_only_exact_true_turns_enforcement_off():
    assert dry_run_requested({"dry_run": "true"})
    for ctx in (None, {}, {"dry_run": "True"}, {"dry_run": "yes"}, {"dry_run": "1"}, {"dryrun": "true"}):
        assert not dry_run_requested(ctx)


def test_errors_and_identity_failures_stay_enforced():
    from extauthz.dry_run import shadow_label
    assert shadow_label("error", True) is None
    assert shadow_label("allow", True) is None
    assert shadow_label("deny", True, "identity.unverified") is None
    assert shadow_label("deny", True, "target.unknown_service") == "would_deny"
    assert shadow_label("approval_required", True) == "would_need_approval"
    assert shadow_label("deny", False) is None
    d = Decision(Outcome.DENY, Mode.ENGINEERS_WITH_APPROVAL, "identity.unverified", "no token")
    assert apply_dry_run(d, True).outcome is Outcome.DENY


def test_unresolvable_mode_still_labelled():
    d = Decision(Outcome.DENY, Mode.UNSPECIFIED, "mode.unspecified", "x")
    assert apply_dry_run(d, False).outcome is Outcome.DENY
