"""Usage summaries from decision audit events, and what each mode would have done."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from owners.usage import render_usage, summarize, would_have
from policy import Grant, GrantSet, Mode, Role
from policy.audit import AuditEvent

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SVC = "rpcauthz.demo.v1.Accounts"


def ev(kind, actor, method, minutes_ago, service=SVC):
    return AuditEvent(kind=kind, actor=actor, at=NOW - timedelta(minutes=minutes_ago),
                      service=service, method=method, outcome=kind.split(".")[1])


EVENTS = [
    ev("decision.allow", "alice", "ReadAccount", 50),
    ev("decision.allow", "alice", "/rpcauthz.demo.v1.Accounts/ReadAccount", 40),
    ev("decision.approval_required", "bob", "ReadAccount", 30),
    ev("decision.deny", "carol", "rpcauthz.demo.v1.Accounts.ReadAccount", 20),
    ev("decision.allow", "alice", "CloseAccount", 10),
    ev("decision.allow", "zed", "ReadAccount", 5, service="other.v1.Svc"),   # other service
    AuditEvent(kind="request.created", actor="bob", at=NOW, service=SVC, method="ReadAccount"),
]
GRANTS = GrantSet([Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER),
                   Grant("carol", Role.ENGINEER), Grant("alice", Role.CONTRIBUTOR, SVC),
                   Grant("carol", Role.SECURITY_ONCALL)])


def test_summary_counts_calls_engineers_last_call_and_outcomes():
    u = summarize(EVENTS, SVC)
    assert set(u) == {"ReadAccount", "CloseAccount"}
    r = u["ReadAccount"]
    assert r.calls == 4 and r.engineers == 3
    assert dict(r.by_engineer) == {"alice": 2, "bob": 1, "carol": 1}
    assert dict(r.outcomes) == {"allow": 2, "approval_required": 1, "deny": 1}
    assert r.last_call == NOW - timedelta(minutes=20)
    assert r.line() == "4 calls by 3 engineers, last 2026-11-25 11:40 UTC"


def test_what_each_mode_would_have_done_uses_real_policy():
    r = summarize(EVENTS, SVC)["ReadAccount"]
    w = would_have(r, SVC, GRANTS, NOW)
    assert w[Mode.ENGINEERS_WITHOUT_APPROVAL] == {"allow": 4, "deny": 0, "approval_required": 0}
    assert w[Mode.ENGINEERS_WITH_APPROVAL] == {"allow": 0, "deny": 0, "approval_required": 4}
    # Only alice (2 calls) contributes to the service.
    assert w[Mode.CONTRIBUTORS_WITHOUT_APPROVAL] == {"allow": 2, "deny": 2, "approval_required": 0}
    assert w[Mode.CONTRIBUTORS_WITH_APPROVAL] == {"allow": 0, "deny": 2, "approval_required": 2}
    # Only carol is security on-call.
    assert w[Mode.BREAK_GLASS_ONLY] == {"allow": 0, "deny": 3, "approval_required": 1}


def test_render_lists_uncalled_methods_and_modes():
    text = render_usage(SVC, summarize(EVENTS, SVC), ["Ping", "ReadAccount"], GRANTS, now=NOW)
    assert "  Ping: no calls by hand in the window" in text
    assert "  ReadAccount: 4 calls by 3 engineers" in text
    assert "    under CONTRIBUTORS_WITHOUT_APPROVAL: allow 2, deny 2" in text
    assert "    alice: 2" in text
