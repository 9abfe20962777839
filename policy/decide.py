"""The decision core: who may call, who may approve, and request state transitions.

Everything here is a pure function of its arguments: no clock, no store, no network.
The rules are the DESIGN mode table (as data: ``policy.mode_facts.MODE_FACTS``):

| mode                          | outright              | with approval                    | approver                       |
|-------------------------------|-----------------------|----------------------------------|--------------------------------|
| ENGINEERS_WITHOUT_APPROVAL    | any engineer          | -                                | -                              |
| ENGINEERS_WITH_APPROVAL       | nobody                | any engineer                     | any other engineer             |
| CONTRIBUTORS_WITHOUT_APPROVAL | service contributors  | -                                | -                              |
| CONTRIBUTORS_WITH_APPROVAL    | nobody                | service contributors             | another contributor            |
| BREAK_GLASS_ONLY              | nobody                | security on-call, with incident  | another security on-call       |

Every caller must first be an engineer; nobody approves their own request.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timedelta

from .errors import AlreadyDecided, InvalidRequest, NotEligible, RequestClosed, RequestExpired, SelfApproval
from .grants import GrantSet
from .mode_facts import MODE_FACTS
from .model import Approval, ApprovalRequest, Decision, Outcome, RequestState, Role, Target
from .modes import Mode
from .rules import Rule


def _holds(grants: GrantSet, principal: str, role: Role, service: str, now: datetime) -> bool:
    """Does ``principal`` hold ``role`` (for contributors: of ``service``) now?"""
    return grants.has(principal, role, now, service if role is Role.CONTRIBUTOR else None)


def _registered(rule: Rule | None) -> Rule:
    """A rule from the mode table that must exist for the branch ``decide()`` is in."""
    if rule is None:
        raise AssertionError("policy.mode_facts lacks a rule decide() needs")
    return rule


def may_request(principal: str, service: str, mode: Mode, grants: GrantSet, now: datetime) -> bool:
    """May ``principal`` call a method of ``service`` in ``mode`` once approved?"""
    facts = MODE_FACTS.get(mode)
    if facts is None or facts.requesters is None or not grants.is_engineer(principal, now):
        return False
    return _holds(grants, principal, facts.requesters, service, now)


def may_approve(approver: str, request: ApprovalRequest, grants: GrantSet, now: datetime) -> bool:
    """Is ``approver`` a suitable *other* person to approve ``request``?"""
    if approver == request.requester:
        return False
    return may_request(approver, request.service, request.mode, grants, now)


def approvers_for(requester: str, service: str, mode: Mode, grants: GrantSet,
                  now: datetime) -> tuple[str, ...]:
    """Everyone who could approve ``requester``'s request for ``service`` in ``mode`` now, from
    the grants (sorted). Empty means nobody can: the requester should hear so at once."""
    if not mode.needs_approval:
        return ()
    people = sorted({g.principal for g in grants})
    return tuple(p for p in people
                 if p != requester and may_request(p, service, mode, grants, now))


def eligible_approvers(r: ApprovalRequest, grants: GrantSet, now: datetime) -> tuple[str, ...]:
    """Who may still approve ``r`` now: eligible, not the requester, not already approved."""
    return tuple(p for p in approvers_for(r.requester, r.service, r.mode, grants, now)
                 if p not in r.approvers)


def decide(principal: str, target: Target, mode: Mode, grants: GrantSet,
           requests: Iterable[ApprovalRequest], now: datetime,
           body_sha256: str | None = None) -> Decision:
    """Decide whether ``principal`` may call ``target`` whose resolved mode is ``mode``.

    ``requests`` are the principal's approval requests for this target (extra ones are
    ignored). Returns ALLOW, DENY or APPROVAL_REQUIRED with the rule that decided and the
    facts it was decided on (the wording is ``policy.rules``'s).
    """
    facts = MODE_FACTS.get(mode) if isinstance(mode, Mode) else None
    if facts is None:
        return Decision(Outcome.DENY, Mode.UNSPECIFIED, Rule.MODE_UNSPECIFIED, {"target": target})
    said = {"principal": principal, "target": target, "mode": mode}
    if not grants.is_engineer(principal, now):
        return Decision(Outcome.DENY, mode, Rule.PRINCIPAL_NOT_ENGINEER, said)

    if facts.callers is not None:  # the modes without approval
        if facts.callers is Role.ENGINEER or _holds(grants, principal, facts.callers, target.service, now):
            return Decision(Outcome.ALLOW, mode, _registered(facts.allow_rule), said)
        return Decision(Outcome.DENY, mode, _registered(facts.not_eligible_rule), said)

    # The modes with approval.
    if not may_request(principal, target.service, mode, grants, now):
        return Decision(Outcome.DENY, mode, _registered(facts.not_eligible_rule), said)

    mine = [r for r in requests if _same_scope(r, principal, target, mode, body_sha256)]
    usable = sorted((r for r in mine if usable_approval(r, now) and _approvers_hold(r, grants, now)),
                    key=lambda r: (r.body_sha256 is None, r.valid_until, r.id))
    if usable:
        r = usable[0]
        return Decision(Outcome.ALLOW, mode, _registered(facts.approved_rule),
                        {**said, "approvers": ", ".join(r.approvers), "request_id": r.id},
                        approval_id=r.id)

    pending = sorted((r for r in mine if r.state is RequestState.PENDING and now < r.expires_at),
                     key=lambda r: (r.created_at, r.id))
    return Decision(Outcome.APPROVAL_REQUIRED, mode, _registered(facts.approval_required_rule),
                    said, pending_request_id=pending[0].id if pending else None)


def _same_scope(r: ApprovalRequest, principal: str, target: Target, mode: Mode,
                body_sha256: str | None) -> bool:
    return (r.requester == principal and r.service == target.service and r.method == target.method
            and r.mode is mode and (r.body_sha256 is None or r.body_sha256 == body_sha256))


def _approvers_hold(r: ApprovalRequest, grants: GrantSet, now: datetime) -> bool:
    """Re-check the approvals themselves, so a bad record in a store can never grant access:
    enough distinct approvers, none of them the requester, each still eligible now."""
    approvers = set(r.approvers)
    return (len(approvers) == len(r.approvers) and len(approvers) >= r.required_approvals
            and all(may_approve(a, r, grants, now) for a in approvers))


def usable_approval(r: ApprovalRequest, now: datetime) -> bool:
    """Approved, within its validity window, and with uses left."""
    return (r.state is RequestState.APPROVED and r.valid_until is not None and now < r.valid_until
            and (r.max_uses is None or r.uses < r.max_uses))


# --- request lifecycle: each returns a new request or raises a PolicyError ---------------

def open_request(*, request_id: str, requester: str, target: Target, mode: Mode,
                 grants: GrantSet, now: datetime, pending_ttl: timedelta = timedelta(hours=1),
                 approval_ttl: timedelta = timedelta(hours=1), reason: str = "",
                 incident: str | None = None, body_sha256: str | None = None,
                 required_approvals: int = 1, max_uses: int | None = None,
                 origin: str = "user") -> ApprovalRequest:
    """Create a pending request after checking the requester may ask for it."""
    if not mode.needs_approval:
        raise InvalidRequest(f"{target} is {mode.name}, which takes no approvals")
    if not may_request(requester, target.service, mode, grants, now):
        raise NotEligible(f"{requester} may not request {target}: under {mode.name} only "
                          f"{MODE_FACTS[mode].role_words} may, with another's approval")
    incident = (incident or "").strip() or None
    if MODE_FACTS[mode].incident_required and incident is None and origin == "user":
        raise InvalidRequest(f"{target} is BREAK_GLASS_ONLY: a request needs an incident reference")
    try:
        return ApprovalRequest(
            id=request_id, requester=requester, service=target.service, method=target.method,
            mode=mode, created_at=now, expires_at=now + pending_ttl, approval_ttl=approval_ttl,
            reason=reason.strip(), incident=incident, body_sha256=body_sha256,
            required_approvals=required_approvals, max_uses=max_uses, origin=origin)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def expire(r: ApprovalRequest, now: datetime) -> ApprovalRequest:
    """Move a pending request past ``expires_at``, or an approval past ``valid_until``, to EXPIRED."""
    if r.state is RequestState.PENDING and now >= r.expires_at:
        return dataclasses.replace(r, state=RequestState.EXPIRED, closed_at=now,
                                   close_reason="not approved in time")
    if r.state is RequestState.APPROVED and r.valid_until is not None and now >= r.valid_until:
        return dataclasses.replace(r, state=RequestState.EXPIRED, closed_at=now,
                                   close_reason="approval expired")
    return r


def _require_pending(r: ApprovalRequest, now: datetime) -> None:
    if r.state is RequestState.PENDING and now >= r.expires_at:
        raise RequestExpired(f"request {r.id} expired at {r.expires_at.isoformat()} without approval")
    if r.state is not RequestState.PENDING:
        raise RequestClosed(f"request {r.id} is {r.state.value}, not pending")


def approve(r: ApprovalRequest, approver: str, grants: GrantSet, now: datetime,
            comment: str = "") -> ApprovalRequest:
    """Record ``approver``'s approval; the request becomes APPROVED once it has enough."""
    if approver == r.requester:
        raise SelfApproval(f"{approver} cannot approve their own request {r.id}")
    if approver in r.approvers:
        raise AlreadyDecided(f"{approver} already approved request {r.id}")
    _require_pending(r, now)
    if MODE_FACTS[r.mode].incident_required and not r.incident:
        raise InvalidRequest(f"request {r.id} is break-glass and has no incident reference yet")
    if not may_approve(approver, r, grants, now):
        raise NotEligible(f"{approver} may not approve request {r.id}: under {r.mode.name} the "
                          f"approver must be {MODE_FACTS[r.mode].role_words} other than the requester")
    approvals = r.approvals + (Approval(approver, now, comment.strip()),)
    if len(approvals) < r.required_approvals:
        return dataclasses.replace(r, approvals=approvals)
    return dataclasses.replace(r, approvals=approvals, state=RequestState.APPROVED,
                               valid_until=now + r.approval_ttl)


def reject(r: ApprovalRequest, reviewer: str, grants: GrantSet, now: datetime,
           reason: str = "") -> ApprovalRequest:
    """An eligible reviewer refuses a pending request."""
    if reviewer == r.requester:
        raise SelfApproval(f"{reviewer} cannot review their own request {r.id}; cancel it instead")
    _require_pending(r, now)
    if not may_approve(reviewer, r, grants, now):
        raise NotEligible(f"{reviewer} may not review request {r.id} under {r.mode.name}")
    return dataclasses.replace(r, state=RequestState.REJECTED, closed_by=reviewer, closed_at=now,
                               close_reason=reason.strip())


def cancel(r: ApprovalRequest, actor: str, now: datetime, reason: str = "") -> ApprovalRequest:
    """The requester withdraws a pending or approved request, or an approver revokes theirs."""
    if actor != r.requester and actor not in r.approvers:
        raise NotEligible(f"only the requester or an approver may cancel request {r.id}")
    if r.state.closed:
        raise RequestClosed(f"request {r.id} is already {r.state.value}")
    return dataclasses.replace(r, state=RequestState.CANCELLED, closed_by=actor, closed_at=now,
                               close_reason=reason.strip())


def complete(r: ApprovalRequest, actor: str, now: datetime, *, reason: str,
             incident: str | None = None) -> ApprovalRequest:
    """The requester gives the reason (and incident) for a request the gateway opened."""
    if actor != r.requester:
        raise NotEligible(f"only {r.requester} can give the reason for request {r.id}")
    _require_pending(r, now)
    incident = (incident or r.incident or "").strip() or None
    if MODE_FACTS[r.mode].incident_required and incident is None:
        raise InvalidRequest(f"request {r.id} is break-glass: give an incident reference")
    return dataclasses.replace(r, reason=reason.strip(), incident=incident, origin="user")


def narrowest_uses(a: int | None, b: int | None) -> int | None:
    """The smaller of two use limits, where ``None`` means unlimited."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def narrow(r: ApprovalRequest, actor: str, now: datetime, *,
           approval_ttl: timedelta | None = None, max_uses: int | None = None,
           body_sha256: str | None = None) -> ApprovalRequest:
    """The requester tightens the limits of their pending, not yet approved request.

    Each limit becomes the narrower of what the request carries and what is asked: a shorter
    approval, fewer uses, or (for a request not bound to a body) one exact body. A limit asked
    wider than the request's is kept as it is: narrowing never widens. Once anybody approved,
    the limits they saw are final; the requester opens a new request instead.
    """
    if actor != r.requester:
        raise NotEligible(f"only {r.requester} can change the limits of request {r.id}")
    _require_pending(r, now)
    if r.approvals:
        raise AlreadyDecided(f"request {r.id} already has approvals; its limits are final")
    if body_sha256 is not None and r.body_sha256 not in (None, body_sha256):
        raise InvalidRequest(f"request {r.id} is bound to another body")
    return dataclasses.replace(
        r, approval_ttl=min(r.approval_ttl, approval_ttl) if approval_ttl else r.approval_ttl,
        max_uses=narrowest_uses(r.max_uses, max_uses),
        body_sha256=r.body_sha256 or body_sha256)


def use(r: ApprovalRequest, now: datetime) -> ApprovalRequest:
    """Spend one use of an approved request; refuse if it is no longer usable."""
    if r.state is not RequestState.APPROVED:
        raise RequestClosed(f"request {r.id} is {r.state.value}, not approved")
    if r.valid_until is None or now >= r.valid_until:
        raise RequestExpired(f"approval {r.id} expired")
    if r.max_uses is not None and r.uses >= r.max_uses:
        raise RequestClosed(f"approval {r.id} has been used {r.uses} of {r.max_uses} times")
    return dataclasses.replace(r, uses=r.uses + 1)


def give_back(r: ApprovalRequest) -> ApprovalRequest:
    """Return one use spent for a call that was then not allowed (a voided spend)."""
    if r.uses < 1:
        raise InvalidRequest(f"approval {r.id} has no use to give back")
    return dataclasses.replace(r, uses=r.uses - 1)
