"""The DESIGN mode table, row by row, through the pure decision core."""
from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

import policy
from policy import (
    AlreadyDecided,
    Grant,
    GrantSet,
    InvalidRequest,
    Mode,
    NotEligible,
    Outcome,
    RequestClosed,
    RequestExpired,
    RequestState,
    Role,
    SelfApproval,
    Target,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SVC = "bank.accounts.v1.Accounts"
T = Target(SVC, "CloseAccount")

GRANTS = GrantSet([
    Grant("eve", Role.ENGINEER), Grant("eric", Role.ENGINEER),
    Grant("carol", Role.ENGINEER), Grant("carol", Role.CONTRIBUTOR, SVC),
    Grant("cody", Role.ENGINEER), Grant("cody", Role.CONTRIBUTOR, SVC),
    Grant("olga", Role.ENGINEER), Grant("olga", Role.CONTRIBUTOR, "bank.ledger.v1.Ledger"),
    Grant("sam", Role.ENGINEER), Grant("sam", Role.SECURITY_ONCALL),
    Grant("sue", Role.ENGINEER), Grant("sue", Role.SECURITY_ONCALL),
    Grant("nina", Role.CONTRIBUTOR, SVC),  # a contributor grant but no engineer grant
])

# (mode, principal) -> outcome with no approvals on file: the DESIGN table.
TABLE = {
    Mode.ENGINEERS_WITHOUT_APPROVAL: dict(nobody="deny", eve="allow", carol="allow", olga="allow", sam="allow"),
    Mode.ENGINEERS_WITH_APPROVAL: dict(nobody="deny", eve="approval_required", carol="approval_required",
                                       olga="approval_required", sam="approval_required"),
    Mode.CONTRIBUTORS_WITHOUT_APPROVAL: dict(nobody="deny", eve="deny", carol="allow", olga="deny", sam="deny"),
    Mode.CONTRIBUTORS_WITH_APPROVAL: dict(nobody="deny", eve="deny", carol="approval_required", olga="deny",
                                          sam="deny"),
    Mode.BREAK_GLASS_ONLY: dict(nobody="deny", eve="deny", carol="deny", olga="deny", sam="approval_required"),
}


@pytest.mark.parametrize("mode,who,expected",
                         [(m, w, e) for m, row in TABLE.items() for w, e in row.items()])
def test_mode_table_without_approvals(mode, who, expected):
    d = policy.decide(who, T, mode, GRANTS, [], NOW)
    assert d.outcome.value == expected, d
    assert d.mode is mode and d.rule
    if d.outcome is Outcome.DENY:
        assert who in d.message, "a denial names the principal"
    assert str(T) in d.message or d.outcome is not Outcome.APPROVAL_REQUIRED


def test_contributor_grant_without_engineer_grant_is_not_enough():
    d = policy.decide("nina", T, Mode.CONTRIBUTORS_WITHOUT_APPROVAL, GRANTS, [], NOW)
    assert d.outcome is Outcome.DENY and d.rule == "principal.not_engineer"


def test_unspecified_mode_denies():
    d = policy.decide("carol", T, Mode.UNSPECIFIED, GRANTS, [], NOW)
    assert d.outcome is Outcome.DENY and d.rule == "mode.unspecified"


def test_expired_grant_does_not_count():
    grants = GrantSet([Grant("tim", Role.ENGINEER, expires_at=NOW - timedelta(seconds=1))])
    assert policy.decide("tim", T, Mode.ENGINEERS_WITHOUT_APPROVAL, grants, [], NOW).outcome is Outcome.DENY
    grants = GrantSet([Grant("tim", Role.ENGINEER, expires_at=NOW + timedelta(seconds=1))])
    assert policy.decide("tim", T, Mode.ENGINEERS_WITHOUT_APPROVAL, grants, [], NOW).outcome is Outcome.ALLOW


def _req(requester="carol", mode=Mode.CONTRIBUTORS_WITH_APPROVAL, **kw):
    return policy.open_request(request_id=kw.pop("request_id", "r1"), requester=requester, target=T,
                               mode=mode, grants=GRANTS, now=NOW, reason="fix stuck account", **kw)


def test_approval_flow_contributors_with_approval():
    r = _req()
    d = policy.decide("carol", T, r.mode, GRANTS, [r], NOW)
    assert d.outcome is Outcome.APPROVAL_REQUIRED and d.pending_request_id == "r1"
    r = policy.approve(r, "cody", GRANTS, NOW + timedelta(minutes=1))
    assert r.state is RequestState.APPROVED and r.approvers == ("cody",)
    d = policy.decide("carol", T, r.mode, GRANTS, [r], NOW + timedelta(minutes=2))
    assert d.outcome is Outcome.ALLOW and d.approval_id == "r1"
    # Someone else cannot ride on carol's approval.
    d = policy.decide("cody", T, r.mode, GRANTS, [r], NOW + timedelta(minutes=2))
    assert d.outcome is Outcome.APPROVAL_REQUIRED and d.approval_id is None


@pytest.mark.parametrize("mode,requester,bad_approvers,good_approver", [
    (Mode.ENGINEERS_WITH_APPROVAL, "eve", ["nobody", "nina"], "eric"),
    (Mode.CONTRIBUTORS_WITH_APPROVAL, "carol", ["eve", "olga", "sam", "nina"], "cody"),
    (Mode.BREAK_GLASS_ONLY, "sam", ["eve", "carol", "cody"], "sue"),
])
def test_only_eligible_others_may_approve(mode, requester, bad_approvers, good_approver):
    r = _req(requester, mode, incident="INC-1")
    with pytest.raises(SelfApproval):
        policy.approve(r, requester, GRANTS, NOW)
    for who in bad_approvers:
        with pytest.raises(NotEligible):
            policy.approve(r, who, GRANTS, NOW)
    assert policy.approve(r, good_approver, GRANTS, NOW).state is RequestState.APPROVED


def test_break_glass_needs_incident():
    with pytest.raises(InvalidRequest, match="incident"):
        _req("sam", Mode.BREAK_GLASS_ONLY)
    r = _req("sam", Mode.BREAK_GLASS_ONLY, origin="gateway")  # the gateway may open it without one
    with pytest.raises(InvalidRequest, match="incident"):
        policy.approve(r, "sue", GRANTS, NOW)
    r = policy.complete(r, "sam", NOW, reason="db on fire", incident="INC-42")
    assert policy.approve(r, "sue", GRANTS, NOW).state is RequestState.APPROVED


def test_ineligible_requester_cannot_open_a_request():
    with pytest.raises(NotEligible):
        _req("olga")
    with pytest.raises(InvalidRequest):
        _req("carol", Mode.ENGINEERS_WITHOUT_APPROVAL)


def test_expired_pending_and_expired_approval():
    r = _req(pending_ttl=timedelta(minutes=5))
    with pytest.raises(RequestExpired):
        policy.approve(r, "cody", GRANTS, NOW + timedelta(minutes=5))
    assert policy.expire(r, NOW + timedelta(minutes=5)).state is RequestState.EXPIRED
    r = policy.approve(r, "cody", GRANTS, NOW, )
    late = r.valid_until
    assert policy.decide("carol", T, r.mode, GRANTS, [r], late).outcome is Outcome.APPROVAL_REQUIRED
    with pytest.raises(RequestExpired):
        policy.use(r, late)


def test_n_of_m_and_double_approval():
    r = _req(required_approvals=2)
    r = policy.approve(r, "cody", GRANTS, NOW)
    assert r.state is RequestState.PENDING
    with pytest.raises(AlreadyDecided):
        policy.approve(r, "cody", GRANTS, NOW)
    grants = GrantSet(list(GRANTS) + [Grant("cat", Role.ENGINEER), Grant("cat", Role.CONTRIBUTOR, SVC)])
    r = policy.approve(r, "cat", grants, NOW)
    assert r.state is RequestState.APPROVED and r.approvers == ("cody", "cat")
    with pytest.raises(RequestClosed):
        policy.approve(r, "olga", grants, NOW)


def test_max_uses_and_body_scope():
    digest = "ab" * 32
    r = policy.approve(_req(max_uses=1, body_sha256=digest), "cody", GRANTS, NOW)
    assert policy.decide("carol", T, r.mode, GRANTS, [r], NOW, body_sha256="cd" * 32).outcome \
        is Outcome.APPROVAL_REQUIRED
    assert policy.decide("carol", T, r.mode, GRANTS, [r], NOW, body_sha256=digest).outcome is Outcome.ALLOW
    r = policy.use(r, NOW)
    assert policy.decide("carol", T, r.mode, GRANTS, [r], NOW, body_sha256=digest).outcome \
        is Outcome.APPROVAL_REQUIRED
    with pytest.raises(RequestClosed):
        policy.use(r, NOW)


def test_mode_change_invalidates_old_approvals():
    r = policy.approve(_req(mode=Mode.ENGINEERS_WITH_APPROVAL), "cody", GRANTS, NOW)
    assert policy.decide("carol", T, Mode.CONTRIBUTORS_WITH_APPROVAL, GRANTS, [r], NOW).outcome \
        is Outcome.APPROVAL_REQUIRED


def test_reject_and_cancel():
    r = _req()
    with pytest.raises(SelfApproval):
        policy.reject(r, "carol", GRANTS, NOW)
    with pytest.raises(NotEligible):
        policy.reject(r, "eve", GRANTS, NOW)
    rejected = policy.reject(r, "cody", GRANTS, NOW, "not during the freeze")
    assert rejected.state is RequestState.REJECTED and rejected.closed_by == "cody"
    with pytest.raises(RequestClosed):
        policy.approve(rejected, "cody", GRANTS, NOW)
    with pytest.raises(NotEligible):
        policy.cancel(r, "eve", NOW)
    approved = policy.approve(r, "cody", GRANTS, NOW)
    revoked = policy.cancel(approved, "cody", NOW, "changed my mind")
    assert revoked.state is RequestState.CANCELLED
    assert policy.decide("carol", T, r.mode, GRANTS, [revoked], NOW).outcome is Outcome.APPROVAL_REQUIRED


def test_resolve_mode_precedence():
    assert policy.resolve_mode(Mode.ENGINEERS_WITHOUT_APPROVAL, Mode.BREAK_GLASS_ONLY) == \
        (Mode.ENGINEERS_WITHOUT_APPROVAL, "method")
    assert policy.resolve_mode(None, Mode.CONTRIBUTORS_WITH_APPROVAL) == \
        (Mode.CONTRIBUTORS_WITH_APPROVAL, "service")
    assert policy.resolve_mode(0, 0) == (Mode.BREAK_GLASS_ONLY, "default")
    assert policy.resolve_mode(99, None, Mode.ENGINEERS_WITH_APPROVAL) == \
        (Mode.ENGINEERS_WITH_APPROVAL, "default")
    with pytest.raises(ValueError):
        policy.resolve_mode(None, None, Mode.UNSPECIFIED)
    assert Mode.parse("break_glass_only") is Mode.BREAK_GLASS_ONLY
    with pytest.raises(ValueError, match="ENGINEERS_WITH_APPROVAL"):
        Mode.parse("ADMINS_ONLY")


@pytest.mark.parametrize("service,method", [("", "M"), ("a..b", "M"), ("pkg.Svc", "M/x"), ("pkg.Svc", ""),
                                            ("pkg.Svc", "M%2F"), ("1pkg.Svc", "M")])
def test_target_rejects_malformed_names(service, method):
    with pytest.raises(ValueError):
        Target(service, method)


def test_frozen_inputs():
    r = _req()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.state = RequestState.APPROVED  # type: ignore[misc]


@pytest.mark.parametrize("service,method", [
    ("pkg.Svc\n", "Do"), ("pkg.Svc", "Do\n"), ("pkg..Svc", "Do"), ("pkg.Svc", "Do-it"), ("", "Do")])
def test_target_refuses_names_that_are_not_grpc_names(service, method):
    """Names are matched whole: a trailing newline ("$" with match) is not a name."""
    with pytest.raises(ValueError):
        Target(service, method)
