"""The approvals use cases, shared by the HTTP API and the web page.

``ApprovalService`` turns "alice approves request r1" into one atomic store update built from
policy's pure lifecycle functions; the store writes the audit event in the same transaction.
Nothing here talks HTTP; errors are policy's (``PolicyError`` subclasses, ``UnknownRequest``,
``StoreError``) so each front end maps them to its own words and status codes.
"""
from __future__ import annotations

import builtins
import dataclasses
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import policy
from policy import (
    AlreadyDecided,
    ApprovalRequest,
    GrantSet,
    InvalidRequest,
    Mode,
    PolicyError,
    RequestClosed,
    RequestState,
    Role,
    Target,
)
from policy.grant_cache import catch_up
from policy.mode_facts import MODE_FACTS
from policy.store import Store
from policy.text_limits import MAX_COMMENT, MAX_INCIDENT, check_length, check_reason

from .config import RequestPolicy

#: Resolves the mode of ``service``/``method`` (reflection in production). Raises on failure.
ModeLookup = Callable[[str, str], Awaitable[Mode]]

#: Why each mode needs approval, in words for the page and CLI (policy's mode table).
MODE_EXPLANATIONS = {m: f.explanation for m, f in MODE_FACTS.items() if f.needs_approval}

#: Who may approve under each mode (may name ``{service}``), from policy's mode table.
APPROVER_WORDS = {m: f.approver_rule for m, f in MODE_FACTS.items() if f.needs_approval}


class AwaitingReason(PolicyError):
    """The gateway opened this request; its requester has not given the reason yet."""

    code = "awaiting_reason"


class NotVisible(PolicyError):
    """The viewer may not see this request, or every request (read scopes)."""

    code = "not_visible"


class ModeUnavailable(policy.StoreError):
    """The method's mode could not be learned right now (reflection down). Never a guess."""

    code = "mode_unavailable"


class _KindChanged(PolicyError):
    """Internal: another approval landed between our read and our write; retry."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def static_modes(modes: Mapping[str, Mode]) -> ModeLookup:
    """A lookup from a fixed ``{"/pkg.Service/Method": Mode}`` map (tests, small demos)."""
    async def lookup(service: str, method: str) -> Mode:
        path = f"/{service}/{method}"
        if path not in modes:
            raise InvalidRequest(f"no mode is known for {path}")
        return modes[path]
    return lookup


def modes_from_source(source: object, default: Mode = policy.DEFAULT_MODE) -> ModeLookup:
    """Adapt a ``reflection_cache.types.ModeSource`` (the reflection cache) to a lookup."""
    async def lookup(service: str, method: str) -> Mode:
        modes = await source.get(service)  # type: ignore[attr-defined]
        return modes.mode_for(method, default)[0]
    return lookup


def lazy_modes(factory: Callable[[], object], default: Mode = policy.DEFAULT_MODE) -> ModeLookup:
    """Like ``modes_from_source``, but builds the source on first use, inside the server's
    event loop (gRPC aio channels, as the reflection cache uses, belong to one loop)::

        lazy_modes(lambda: ReflectionCache(EndpointResolver(static={...})), Mode.BREAK_GLASS_ONLY)
    """
    holder: list[ModeLookup] = []

    async def lookup(service: str, method: str) -> Mode:
        if not holder:
            holder.append(modes_from_source(factory(), default))
        return await holder[0](service, method)
    return lookup


def awaiting_reason(r: ApprovalRequest) -> bool:
    """True for a gateway-opened request whose requester has not said why yet."""
    return r.origin == "gateway" and r.state is RequestState.PENDING


def approver_words(r: ApprovalRequest) -> str:
    return APPROVER_WORDS[r.mode].format(service=r.service)


def routing_note(r: ApprovalRequest, eligible: Sequence[str]) -> str:
    """What the requester must hear when too few people can approve ``r`` (else "")."""
    if r.state is not RequestState.PENDING:
        return ""
    return shortfall_note(approver_words(r), r.required_approvals - len(r.approvals), eligible)


def shortfall_note(approver_rule: str, missing: int, eligible: Sequence[str], *,
                   grant_hint: str = "mpactl grants add, or the service's owners in the catalog") -> str:
    """The routing warning for a pending request that needs ``missing`` more approvals under
    ``approver_rule`` when only ``eligible`` can give them ("" when enough can). RPC and
    credential (broker) requests alike say it in these words."""
    if len(eligible) >= missing:
        return ""
    if not eligible:
        who = f"Nobody can approve this request now: it needs {approver_rule}, and nobody else holds that role."
    else:
        who = (f"Only {len(eligible)} people can approve this request now "
               f"({', '.join(eligible)}) and it needs {missing} more approvals.")
    return who + f" Ask an operator to grant the role ({grant_hint}), or withdraw the request."


@dataclasses.dataclass(frozen=True)
class Permissions:
    """What the viewer may do with a request, and if not, why not (for page and API)."""

    can_approve: bool
    can_reject: bool
    can_cancel: bool
    can_complete: bool
    why_not: str


class ApprovalService:
    """Create, read and move approval requests for authenticated principals."""

    def __init__(self, store: Store, rules: RequestPolicy, mode_lookup: ModeLookup | None = None,
                 clock: Callable[[], datetime] = utcnow, auditors: Iterable[str] = ()) -> None:
        self.store = store
        #: Principals who may read every request (``auditors`` in the approvals config), besides
        #: holders of an ``auditor`` grant (``is_auditor``).
        self.auditors = frozenset(auditors)
        self.rules = rules
        self.mode_lookup = mode_lookup
        self.clock = clock
        self._grants_lock = threading.Lock()
        self._grants: GrantSet | None = None

    # --- grants ---------------------------------------------------------------------------
    def grants(self) -> GrantSet:
        """The current grants, brought up to date only when the store's revision moved."""
        revision = self.store.grants_revision()
        with self._grants_lock:
            if self._grants is None or self._grants.revision != revision:
                # the change log's delta when it reaches back, else everything
                self._grants = catch_up(self.store, self._grants)
            return self._grants

    def eligible(self, r: ApprovalRequest) -> tuple[str, ...]:
        """Who may still approve ``r`` now, from the current grants."""
        return policy.eligible_approvers(r, self.grants(), self.clock())

    def is_auditor(self, viewer: str) -> bool:
        """May ``viewer`` read every request: listed in ``auditors``, or holding an unexpired
        ``auditor`` grant (``mpactl grants add VIEWER auditor``)."""
        return viewer in self.auditors or self.grants().has(viewer, Role.AUDITOR, self.clock())

    # --- reading --------------------------------------------------------------------------
    def get(self, request_id: str) -> ApprovalRequest:
        """The request; a pending one past its expiry is expired (and audited) first."""
        r = self.store.get_request(request_id)
        return self._expire_if_due(r)

    def may_view(self, r: ApprovalRequest, viewer: str) -> bool:
        """Read scope: the requester, whoever approved it or may approve it, and auditors."""
        if viewer == r.requester or viewer in r.approvers or self.is_auditor(viewer):
            return True
        return policy.may_approve(viewer, r, self.grants(), self.clock())

    def view(self, request_id: str, viewer: str) -> ApprovalRequest:
        """``get``, for ``viewer``; ``NotVisible`` unless ``may_view``."""
        r = self.get(request_id)
        if not self.may_view(r, viewer):
            raise NotVisible(f"{viewer} may not see request {request_id}: a request is visible to its "
                             f"requester, to those who may approve it ({approver_words(r)}) and to auditors")
        return r

    def list(self, viewer: str, *, scope: str = "mine", states: Sequence[RequestState] | None = None,
             limit: int = 100) -> list[ApprovalRequest]:
        """``mine``: viewer's requests; ``reviewable``: pending ones the viewer may approve now;
        ``all``: everything visible (newest first)."""
        if scope == "mine":
            found = self.store.find_requests(requester=viewer, states=states, limit=limit)
        elif scope == "reviewable":
            wanted = states or [RequestState.PENDING]
            if any(s is not RequestState.PENDING for s in wanted):
                return []
            now, grants = self.clock(), self.grants()
            found = [r for r in self.store.find_requests(states=[RequestState.PENDING], limit=1000)
                     if now < r.expires_at and not awaiting_reason(r)
                     and viewer not in r.approvers and policy.may_approve(viewer, r, grants, now)]
            found = found[:limit]
        elif scope == "all":
            if not self.is_auditor(viewer):
                raise NotVisible(f"scope=all lists every request with its reasons and incidents and is "
                                 f"for auditors only ({viewer} is not one: an `auditor` grant or `auditors` "
                                 "in the approvals config makes one); use scope=mine or scope=reviewable")
            found = self.store.find_requests(states=states, limit=limit)
        else:
            raise InvalidRequest(f"unknown list scope {scope!r}; use mine, reviewable or all")
        return [self._expire_if_due(r) for r in found]

    def permissions(self, r: ApprovalRequest, viewer: str) -> Permissions:
        """What ``viewer`` may do with ``r`` right now, with the reason when not."""
        now, grants = self.clock(), self.grants()
        is_requester = viewer == r.requester
        pending = r.state is RequestState.PENDING and now < r.expires_at
        eligible = policy.may_approve(viewer, r, grants, now)
        can_cancel = (is_requester or viewer in r.approvers) and not r.state.closed
        can_complete = is_requester and pending and awaiting_reason(r)
        if not pending:
            why = (f"This request is {r.state.value}; it can no longer be approved or rejected."
                   if r.state is not RequestState.PENDING else
                   "This request expired before it was approved.")
        elif is_requester:
            why = ("You asked for this; nobody approves their own request. It needs "
                   f"{approver_words(r)}.")
        elif awaiting_reason(r):
            why = f"Waiting for {r.requester} to give a reason before anyone can review it."
        elif viewer in r.approvers:
            why = "You already approved this request."
        elif not eligible:
            why = (f"You may not review this request: under {r.mode.name} the approver must be "
                   f"{approver_words(r)}.")
        else:
            why = ""
        can_review = pending and not why
        return Permissions(can_review, can_review, can_cancel, can_complete, why)

    # --- changing -------------------------------------------------------------------------
    async def resolve_mode(self, service: str, method: str) -> Mode:
        from enclave_bridge.trust import TRUST_METHOD, TRUST_MODE, TRUST_SERVICE
        if (service, method) == (TRUST_SERVICE, TRUST_METHOD):
            return TRUST_MODE  # a change of the broker's trusted measurement: fixed, not reflected
        if self.mode_lookup is None:
            raise InvalidRequest("this approvals server has no way to look up method modes")
        return await self.mode_lookup(service, method)

    def create(self, requester: str, target: Target, mode: Mode, *, reason: str,
               incident: str | None = None, body_sha256: str | None = None,
               duration: timedelta | None = None, max_uses: int | None = None
               ) -> tuple[ApprovalRequest, bool]:
        """Open a request with a reason, or give the reason for the same-scope pending one.

        Returns (request, created). The request carries the narrowest of policy and requester:
        an existing pending request for the same scope that nobody approved yet is reused and
        its limits narrowed to what the requester asks (never widened); if the gateway opened
        it, this also completes it with the reason. If somebody already approved it, a
        narrower ask opens a request of its own.
        """
        self._check_reason(reason)
        approval_ttl = self._approval_ttl(duration)
        now = self.clock()
        fresh = policy.open_request(
            request_id=new_request_id(), requester=requester, target=target, mode=mode,
            grants=self.grants(), now=now, pending_ttl=self.rules.pending_ttl,
            approval_ttl=approval_ttl, reason=reason, incident=incident, body_sha256=body_sha256,
            required_approvals=self.rules.required_approvals(target.service, mode),
            max_uses=max_uses, origin="user")
        r, created = self.store.get_or_create_pending(fresh, actor=requester)
        if created:
            return r, True
        if r.approvals:
            if narrower_than(fresh, r, duration is not None):
                return self.store.create_request(fresh, actor=requester), True
            return r, False
        asked = approval_ttl if duration is not None else None
        if awaiting_reason(r):
            return self.complete(r.id, requester, reason=reason, incident=incident,
                                 approval_ttl=asked, max_uses=max_uses), False
        return self.narrow(r.id, requester, approval_ttl=asked, max_uses=max_uses), False

    def narrow(self, request_id: str, actor: str, *, approval_ttl: timedelta | None = None,
               max_uses: int | None = None, body_sha256: str | None = None) -> ApprovalRequest:
        """Tighten a pending request's limits (audited as ``request.narrowed`` when it changed)."""
        r = self.get(request_id)
        now = self.clock()
        if policy.narrow(r, actor, now, approval_ttl=approval_ttl, max_uses=max_uses,
                         body_sha256=body_sha256) == r:
            return r
        return self.store.update_request(
            request_id, lambda cur: policy.narrow(cur, actor, now, approval_ttl=approval_ttl,
                                                  max_uses=max_uses, body_sha256=body_sha256),
            actor=actor, kind="request.narrowed", reason=limits_words(approval_ttl, max_uses))

    def open_gateway_request(self, requester: str, target: Target,
                             body_sha256: str | None) -> ApprovalRequest | None:
        """The requester's pending gateway-opened request this ask can complete, if any: the
        same scope, or any call when the ask binds one body (completing narrows it to that)."""
        now = self.clock()
        for r in self.store.find_requests(requester=requester, service=target.service,
                                          method=target.method, states=[RequestState.PENDING]):
            if (awaiting_reason(r) and r.body_sha256 in (body_sha256, None)
                    and now < r.expires_at):
                return r
        return None

    def complete(self, request_id: str, actor: str, *, reason: str,
                 incident: str | None = None, approval_ttl: timedelta | None = None,
                 max_uses: int | None = None, body_sha256: str | None = None) -> ApprovalRequest:
        """The requester gives the reason for a request the gateway opened, and may narrow its
        limits (shorter approval, fewer uses, one exact body) in the same step."""
        self._check_reason(reason)
        check_length("incident", incident, MAX_INCIDENT)
        if approval_ttl is not None:
            approval_ttl = self._approval_ttl(approval_ttl)
        r = self.get(request_id)
        if not awaiting_reason(r) and r.state is RequestState.PENDING and actor == r.requester:
            raise AlreadyDecided(f"request {r.id} already has its reason")
        now = self.clock()

        def change(cur: ApprovalRequest) -> ApprovalRequest:
            done = policy.complete(cur, actor, now, reason=reason, incident=incident)
            return policy.narrow(done, actor, now, approval_ttl=approval_ttl, max_uses=max_uses,
                                 body_sha256=body_sha256)
        return self.store.update_request(request_id, change, actor=actor,
                                         kind="request.completed", reason=reason.strip())

    def approve(self, request_id: str, approver: str, comment: str = "") -> ApprovalRequest:
        """Record an approval; the request is APPROVED once it has enough distinct approvers."""
        check_length("comment", comment, MAX_COMMENT)
        for _ in range(5):
            r = self.get(request_id)
            if awaiting_reason(r) and approver != r.requester and approver not in r.approvers:
                raise AwaitingReason(f"request {r.id} is waiting for {r.requester} to give a "
                                     "reason; it cannot be reviewed yet")
            final = len(r.approvals) + 1 >= r.required_approvals
            kind = "request.approved" if final else "request.approval_recorded"
            now, grants = self.clock(), self.grants()

            def change(cur: ApprovalRequest, final: bool = final, grants: GrantSet = grants,
                       now: datetime = now) -> ApprovalRequest:
                if (len(cur.approvals) + 1 >= cur.required_approvals) != final:
                    raise _KindChanged("approvals changed meanwhile")
                return policy.approve(cur, approver, grants, now, comment)
            try:
                return self.store.update_request(request_id, change, actor=approver, kind=kind,
                                                 reason=comment.strip())
            except _KindChanged:
                continue
        raise policy.StoreError(f"request {request_id} kept changing; try again")

    def reject(self, request_id: str, reviewer: str, reason: str = "") -> ApprovalRequest:
        check_length("comment", reason, MAX_COMMENT)
        r = self.get(request_id)
        if awaiting_reason(r) and reviewer != r.requester:
            raise AwaitingReason(f"request {r.id} is waiting for {r.requester} to give a reason; "
                                 "it cannot be reviewed yet")
        now, grants = self.clock(), self.grants()
        return self.store.update_request(
            request_id, lambda cur: policy.reject(cur, reviewer, grants, now, reason),
            actor=reviewer, kind="request.rejected", reason=reason.strip())

    def cancel(self, request_id: str, actor: str, reason: str = "") -> ApprovalRequest:
        """Withdraw (requester) or revoke (an approver) a pending or approved request."""
        check_length("comment", reason, MAX_COMMENT)
        self.get(request_id)
        now = self.clock()
        return self.store.update_request(
            request_id, lambda cur: policy.cancel(cur, actor, now, reason),
            actor=actor, kind="request.cancelled", reason=reason.strip())

    def sweep_expired(self) -> builtins.list[ApprovalRequest]:  # `list` here is the method above
        """Expire every pending request past ``expires_at`` and approval past ``valid_until``.

        Each expiry is one atomic update with a ``request.expired`` audit event. Returns the
        requests this call expired.
        """
        expired: builtins.list[ApprovalRequest] = []
        for r in self.store.due_requests(self.clock(), limit=10_000):
            done = self._expire_if_due(r)
            if done is not r and done.state is RequestState.EXPIRED:
                expired.append(done)
        return expired

    # --- helpers --------------------------------------------------------------------------
    def _expire_if_due(self, r: ApprovalRequest) -> ApprovalRequest:
        now = self.clock()
        if policy.expire(r, now) is r:
            return r

        def change(cur: ApprovalRequest) -> ApprovalRequest:
            after = policy.expire(cur, now)
            if after is cur:
                raise RequestClosed("nothing to expire")  # someone else moved it; write nothing
            return after
        try:
            return self.store.update_request(r.id, change, actor="system", kind="request.expired",
                                             reason="expired")
        except RequestClosed:
            return self.store.get_request(r.id)

    def _check_reason(self, reason: str) -> None:
        check_reason(reason, self.rules.min_reason_length, "this call")

    def _approval_ttl(self, duration: timedelta | None) -> timedelta:
        if duration is None:
            return self.rules.default_approval_ttl
        if duration <= timedelta(0):
            raise InvalidRequest("the approval duration must be positive")
        if duration > self.rules.max_approval_ttl:
            raise InvalidRequest(f"an approval can last at most {spoken_duration(self.rules.max_approval_ttl)}; "
                                 f"this one asked for {spoken_duration(duration)}")
        return duration


def spoken_duration(td: timedelta) -> str:
    """``td`` as people say it: "8 hours", "1 hour", "90 minutes", "45 seconds" (the page's
    and the API's words; the CLI prints the ``--duration`` form, ``mpa.cli.duration_words``)."""
    s = int(td.total_seconds())
    if s and s % 3600 == 0:
        return f"{s // 3600} hour{'s' if s != 3600 else ''}"
    if s and s % 60 == 0:
        return f"{s // 60} minute{'s' if s != 60 else ''}"
    return f"{s} second{'s' if s != 1 else ''}"


def narrower_than(ask: ApprovalRequest, r: ApprovalRequest, ttl_asked: bool) -> bool:
    """Does ``ask`` limit anything more tightly than ``r`` does?"""
    return ((ttl_asked and ask.approval_ttl < r.approval_ttl)
            or policy.narrowest_uses(ask.max_uses, r.max_uses) != r.max_uses)


def limits_words(approval_ttl: timedelta | None, max_uses: int | None) -> str:
    """The limits a requester asked for, in words for the audit log."""
    parts = []
    if approval_ttl is not None:
        parts.append(f"approval lasts at most {int(approval_ttl.total_seconds())} s")
    if max_uses is not None:
        parts.append(f"at most {max_uses} call{'s' if max_uses != 1 else ''}")
    return "; ".join(parts) or "limits asked"


def new_request_id() -> str:
    """An unguessable request id (it appears in links)."""
    return uuid.uuid4().hex


__all__ = ["ApprovalService", "AwaitingReason", "MODE_EXPLANATIONS", "ModeLookup", "ModeUnavailable",
           "Permissions", "approver_words", "awaiting_reason", "routing_note", "shortfall_note", "lazy_modes", "limits_words",
           "modes_from_source", "narrower_than", "spoken_duration", "static_modes"]
