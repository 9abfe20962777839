"""Property tests: no combination of grants, requests, modes and times yields an allow
(or an approval path) that the DESIGN mode table does not grant."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

import policy
from policy import Approval, ApprovalRequest, Grant, GrantSet, Mode, Outcome, PolicyError, RequestState, Role, Target

PEOPLE = ["ann", "bob", "cat", "dan", "eli"]
SERVICES = ["pkg.v1.Alpha", "pkg.v1.Beta"]
METHODS = ["Get", "Put"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
times = st.integers(min_value=-7200, max_value=7200).map(lambda s: T0 + timedelta(seconds=s))
maybe_times = st.none() | times


@st.composite
def grants(draw):
    out = []
    for who in PEOPLE:
        for role in Role:
            services = SERVICES if role is Role.CONTRIBUTOR else [None]
            for svc in services:
                if draw(st.booleans()):
                    out.append(Grant(who, role, svc, expires_at=draw(maybe_times)))
    return GrantSet(out)


def biased(value, choices):
    """Usually ``value`` (so requests often match the call under test), sometimes anything."""
    return st.one_of(st.just(value), st.just(value), st.sampled_from(choices))


@st.composite
def requests(draw, who=None, service=None, method=None, mode=None, now=T0):
    """Arbitrary stored requests, including ones no honest code path would produce,
    biased towards the principal, target, mode and validity of the call being decided."""
    approval_modes = [Mode.ENGINEERS_WITH_APPROVAL, Mode.CONTRIBUTORS_WITH_APPROVAL,
                      Mode.BREAK_GLASS_ONLY]
    mode = draw(biased(mode, approval_modes) if mode in approval_modes else st.sampled_from(approval_modes))
    approvers = draw(st.lists(st.sampled_from(PEOPLE), max_size=3))
    created = draw(times)
    return ApprovalRequest(
        id=draw(st.uuids()).hex, requester=draw(biased(who or PEOPLE[0], PEOPLE)),
        service=draw(biased(service or SERVICES[0], SERVICES)),
        method=draw(biased(method or METHODS[0], METHODS)), mode=mode,
        created_at=created, expires_at=created + timedelta(hours=1),
        body_sha256=draw(st.none() | st.sampled_from(["a" * 64, "b" * 64])),
        required_approvals=draw(st.integers(1, 3)), max_uses=draw(st.none() | st.integers(1, 3)),
        uses=draw(st.integers(0, 3)), state=draw(biased(RequestState.APPROVED, list(RequestState))),
        approvals=tuple(Approval(a, created) for a in approvers), valid_until=draw(st.one_of(st.just(now + timedelta(minutes=5)), maybe_times)),
        incident=draw(st.none() | st.just("INC-1")))


def table_allows_outright(who, target, mode, g, now):
    if not g.is_engineer(who, now):
        return False
    return (mode is Mode.ENGINEERS_WITHOUT_APPROVAL
            or (mode is Mode.CONTRIBUTORS_WITHOUT_APPROVAL and g.is_contributor(who, target.service, now)))


def table_may_request(who, service, mode, g, now):
    if not g.is_engineer(who, now):
        return False
    return {Mode.ENGINEERS_WITH_APPROVAL: True,
            Mode.CONTRIBUTORS_WITH_APPROVAL: g.is_contributor(who, service, now),
            Mode.BREAK_GLASS_ONLY: g.is_security_oncall(who, now)}.get(mode, False)


def honest_approval_exists(who, target, mode, g, reqs, now, body):
    for r in reqs:
        if (r.requester == who and r.service == target.service and r.method == target.method
                and r.mode is mode and r.state is RequestState.APPROVED
                and r.valid_until is not None and now < r.valid_until
                and (r.max_uses is None or r.uses < r.max_uses)
                and (r.body_sha256 is None or r.body_sha256 == body)
                and len(set(r.approvers)) == len(r.approvers) >= r.required_approvals
                and who not in r.approvers
                and all(table_may_request(a, r.service, mode, g, now) for a in r.approvers)):
            return True
    return False


@settings(max_examples=600, deadline=None)
@given(who=st.sampled_from(PEOPLE), service=st.sampled_from(SERVICES), method=st.sampled_from(METHODS),
       mode=st.sampled_from(list(Mode)), g=grants(), now=times, data=st.data(),
       body=st.none() | st.sampled_from(["a" * 64, "b" * 64]))
def test_decide_never_exceeds_the_table(who, service, method, mode, g, now, data, body):
    reqs = data.draw(st.lists(requests(who, service, method, mode, now), max_size=4))
    target = Target(service, method)
    d = policy.decide(who, target, mode, g, reqs, now, body)
    if d.outcome is Outcome.ALLOW:
        assert table_allows_outright(who, target, mode, g, now) or (
            mode.needs_approval and table_may_request(who, service, mode, g, now)
            and honest_approval_exists(who, target, mode, g, reqs, now, body)), d
    if d.outcome is Outcome.APPROVAL_REQUIRED:
        assert mode.needs_approval and table_may_request(who, service, mode, g, now), d
    if d.outcome is Outcome.DENY and table_allows_outright(who, target, mode, g, now):
        raise AssertionError(f"the table allows this outright but decide denied: {d}")


@settings(max_examples=300, deadline=None)
@given(requester=st.sampled_from(PEOPLE), approvers=st.lists(st.sampled_from(PEOPLE), max_size=6),
       mode=st.sampled_from([Mode.ENGINEERS_WITH_APPROVAL, Mode.CONTRIBUTORS_WITH_APPROVAL,
                             Mode.BREAK_GLASS_ONLY]),
       g=grants(), required=st.integers(1, 3))
def test_transitions_only_record_eligible_other_approvers(requester, approvers, mode, g, required):
    target = Target(SERVICES[0], METHODS[0])
    try:
        r = policy.open_request(request_id="r", requester=requester, target=target, mode=mode, grants=g,
                                now=T0, reason="why", incident="INC-9", required_approvals=required)
    except PolicyError:
        assert not table_may_request(requester, target.service, mode, g, T0)
        return
    for a in approvers:
        try:
            r = policy.approve(r, a, g, T0)
        except PolicyError:
            pass
    assert requester not in r.approvers
    assert len(set(r.approvers)) == len(r.approvers)
    assert all(table_may_request(a, target.service, mode, g, T0) for a in r.approvers)
    assert (r.state is RequestState.APPROVED) == (len(r.approvers) >= required)
