"""One Check, as four explicit steps (the Authorino shape):

1. identity      who is calling (``identity.identify``: the verified JWT payload)
2. metadata      what is called (``target.parse_path``), its mode (reflection, via a
                 ``ModeSource``), the caller's grants (in memory) and, only for the
                 approval modes, the caller's approval requests for that method (store)
3. authorization ``policy.decide``; an allow through an approval spends one use atomically;
                 approval required opens (or reuses) a pending request
4. response      ``responses.build``

The whole pipeline runs under one deadline below Envoy's ext_authz timeout. Anything that
goes wrong (a reflection or store error, the deadline, a bug) is a 503, never an allow.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from typing import Protocol

from envoy.service.auth.v3 import external_auth_pb2

import policy
from policy import GrantSet, Mode, Outcome, RequestState, Target
from policy.audit import AuditEvent
from policy.errors import PolicyError
from reflection_cache.types import ModeSource, ReflectionError, UnknownMethod, UnknownService

from . import responses
from .audit_writer import AuditWriter
from .body import grpc_message_digest
from .config import Settings
from .dry_run import dry_run_requested, shadow_label
from .identity import Identity, IdentityError, identify
from .metrics import Metrics
from .target import BadPath, parse_path
from .verdict import Kind, Verdict

log = logging.getLogger("extauthz")

_OPEN_STATES = (RequestState.PENDING, RequestState.APPROVED)


class GrantSource(Protocol):
    """Grants served from memory (``policy.grant_cache.GrantCache``)."""

    def current(self) -> GrantSet: ...


class _Progress:
    """What the steps have learned so far about one check (so even a timeout can say who
    and what); ``verdict()`` turns it into the final, immutable ``Verdict``."""

    __slots__ = ("decision_id", "dev", "dry_run", "principal", "target", "mode", "mode_source")

    def __init__(self, decision_id: str, dev: bool, dry_run: bool = False) -> None:
        self.decision_id, self.dev, self.dry_run = decision_id, dev, dry_run
        self.principal: str | None = None
        self.target: Target | None = None
        self.mode: Mode | None = None
        self.mode_source: str | None = None

    def verdict(self, kind: Kind, rule: str, message: str, advice: str = "", **extra) -> Verdict:
        return Verdict(kind, self.decision_id, rule, message, advice, self.principal, self.target,
                       self.mode, self.mode_source, dev=self.dev, dry_run=self.dry_run, **extra)


class _Failure(Exception):
    """A dependency failed: the pipeline answers 503 with this rule and message."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


_ADVICE_ROLE = {
    Mode.ENGINEERS_WITH_APPROVAL: "another engineer",
    Mode.CONTRIBUTORS_WITH_APPROVAL: "another contributor of {service}",
    Mode.BREAK_GLASS_ONLY: "another security on-call engineer",
}


class Authorizer:
    """Turns a ``CheckRequest`` into a ``CheckResponse``; shared by every connection."""

    def __init__(self, settings: Settings, *, store, grants: GrantSource, modes: ModeSource,
                 audit: AuditWriter, metrics: Metrics, executor: Executor | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.store = store
        self.grants = grants
        self.modes = modes
        self.audit = audit
        self.metrics = metrics
        self.executor = executor
        self.clock = clock
        self._deadline = settings.decision_deadline_ms / 1000.0
        # Headers every response removes besides forged x-rpcauthz-* ones (dev mode's header).
        self._also_remove: tuple[str, ...] = (
            (settings.identity.dev_principal_header,) if settings.identity.dev_mode else ())
        self._get_fresh = getattr(modes, "get_fresh", None)

    # --- entry point ------------------------------------------------------------------------

    async def check(self, req: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        decision_id = os.urandom(16).hex()  # as unique as a uuid4, a few µs cheaper
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        # What the steps learned so far, so a timeout can still say who and what.
        p = _Progress(decision_id, self.settings.identity.dev_mode,
                      dry_run_requested(req.attributes.context_extensions))
        try:
            try:
                # With warm caches most checks are decided from memory without awaiting
                # anything, so no deadline can pass and no timer needs arming. The rest
                # (a cache miss, the approval modes' store I/O) run under the deadline.
                verdict = self._decide_from_memory(req, p)
                if verdict is None:
                    async with asyncio.timeout(self._deadline):
                        verdict = await self._decide(req, p)
            except TimeoutError:
                verdict = p.verdict(Kind.ERROR, "deadline.exceeded",
                                    f"no decision within {self.settings.decision_deadline_ms} ms",
                                    "retry shortly; if it persists, tell the gateway operators")
            except Exception:  # a bug must never become an allow
                log.exception("decision %s failed unexpectedly", decision_id)
                verdict = p.verdict(Kind.ERROR, "internal.error",
                                    "the authorization server failed while deciding",
                                    "retry; if it persists, tell the gateway operators "
                                    f"and quote decision {decision_id}")
            if verdict.kind is Kind.ERROR:
                self._audit_error(verdict)
            if verdict.dry_run:
                verdict = self._dry_run(verdict)
            self.metrics.record(verdict, time.perf_counter() - started)
            return responses.build(verdict, req.attributes.request.http.headers, self._also_remove)
        finally:
            self.metrics.in_flight.dec()

    # --- the four steps ---------------------------------------------------------------------

    def _decide_from_memory(self, req: external_auth_pb2.CheckRequest, p: _Progress) -> Verdict | None:
        """The verdict when everything it needs is in memory (the mode source has a fresh
        entry, and no approval request must be read); None, with nothing done that counts
        (no audit, no metrics), when ``_decide`` must run instead."""
        get_fresh = self._get_fresh
        if get_fresh is None:
            return None
        step = self._identify_and_target(req, p)
        if isinstance(step, Verdict):
            return step
        who, target, http = step
        modes = get_fresh(target.service)
        if modes is None:
            return None
        try:
            mode, source = modes.mode_for(target.method, self.settings.default_mode)
        except UnknownMethod as e:
            return self._unknown_target(p, e)
        step = self._grants_and_body(p, http, mode, source)
        if isinstance(step, Verdict):
            return step
        grants, digest = step
        decision = policy.decide(who.principal, target, mode, grants, (), self.clock(), digest)
        if decision.outcome is Outcome.APPROVAL_REQUIRED:
            return None  # the caller's approval requests are in the store
        return self._finish(p, decision)

    async def _decide(self, req: external_auth_pb2.CheckRequest, p: _Progress) -> Verdict:
        # 1. identity (and the target)
        step = self._identify_and_target(req, p)
        if isinstance(step, Verdict):
            return step
        who, target, http = step

        # 2. metadata: mode, grants
        try:
            mode, source = await self._mode_of(target)
        except (UnknownService, UnknownMethod) as e:
            return self._unknown_target(p, e)
        except ReflectionError as e:
            self.metrics.reflection_errors.labels(e.code).inc()
            return p.verdict(Kind.ERROR, f"reflection.{e.code}", f"cannot learn the mode of {target}: {e}",
                             "retry shortly; if it persists, the service's reflection endpoint "
                             "needs attention")
        step = self._grants_and_body(p, http, mode, source)
        if isinstance(step, Verdict):
            return step
        grants, digest = step

        # 3. authorization
        try:
            return await self._authorize(p, who, target, mode, grants, digest)
        except _Failure as f:
            return p.verdict(Kind.ERROR, f.rule, str(f), "retry shortly; the gateway's store needs attention")

    def _identify_and_target(self, req: external_auth_pb2.CheckRequest, p: _Progress
                             ) -> Verdict | tuple[Identity, Target, external_auth_pb2.AttributeContext.HttpRequest]:
        """Steps 1 and 2a: who calls which method, or the denial that says why not."""
        try:
            who = identify(req, self.settings.identity)
        except IdentityError as e:
            return self._deny(p.verdict(Kind.DENY, "identity.unverified", str(e),
                                        "log in (mpa login) and send your token "
                                        "as 'authorization: Bearer ...'"))
        p.principal = who.principal
        http = req.attributes.request.http
        try:
            target = parse_path(http.path, self.settings.max_path_length)
        except BadPath as e:
            return self._deny(p.verdict(Kind.DENY, "target.bad_path", str(e),
                                        "call a gRPC method as /package.Service/Method"))
        p.target = target
        if http.method and http.method != "POST":
            return self._deny(p.verdict(Kind.DENY, "target.not_grpc",
                                        f"HTTP method {http.method} is not a gRPC call",
                                        "use a gRPC client (gRPC calls are HTTP/2 POST)"))
        return who, target, http

    def _unknown_target(self, p: _Progress, e: ReflectionError) -> Verdict:
        rule = "target.unknown_service" if isinstance(e, UnknownService) else "target.unknown_method"
        return self._deny(p.verdict(Kind.DENY, rule, str(e), "check the service and method name"))

    def _grants_and_body(self, p: _Progress, http, mode: Mode, source: str
                         ) -> Verdict | tuple[GrantSet, str | None]:
        """Step 2b: the caller's grants (memory) and the body's digest, or why not."""
        p.mode, p.mode_source = mode, source
        try:
            grants = self.grants.current()
        except Exception as e:
            self.metrics.store_errors.labels("grants").inc()
            return p.verdict(Kind.ERROR, "store.unavailable", f"grants are not available: {e}",
                             "retry shortly; the gateway's store needs attention")
        if http.raw_body and http.size > len(http.raw_body):
            # Envoy sent only the first max_request_bytes (it does so for a body that arrives
            # at once, even with allow_partial_message: false). Never authorize on a prefix.
            return self._deny(p.verdict(
                Kind.DENY, "request.body_too_large",
                f"the request body is {http.size} bytes; the gateway inspects at most "
                f"{len(http.raw_body)}",
                "send a smaller request, or ask the gateway operators to raise "
                "with_request_body.max_request_bytes"))
        digest = grpc_message_digest(http.raw_body) if http.raw_body else None
        return grants, digest

    async def _mode_of(self, target: Target) -> tuple[Mode, str]:
        modes = await self.modes.get(target.service)
        return modes.mode_for(target.method, self.settings.default_mode)

    async def _authorize(self, p: _Progress, who: Identity, target: Target, mode: Mode,
                         grants: GrantSet, digest: str | None) -> Verdict:
        now = self.clock()
        decision = policy.decide(who.principal, target, mode, grants, (), now, digest)
        if decision.outcome is not Outcome.APPROVAL_REQUIRED:
            # Without approval modes the caller's requests cannot change the answer: no I/O.
            return self._finish(p, decision)
        for _attempt in range(3):
            requests = await self._io("find_requests", self.store.find_requests,
                                      requester=who.principal, service=target.service,
                                      method=target.method, states=_OPEN_STATES)
            now = self.clock()
            decision = policy.decide(who.principal, target, mode, grants, requests, now, digest)
            if decision.outcome is Outcome.ALLOW and decision.approval_id:
                try:
                    used = await self._io(
                        "update_request", self.store.update_request, decision.approval_id,
                        lambda r, now=now: policy.use(r, now), actor=who.principal,
                        kind="decision.allow_with_approval",
                        reason=f"call {target} (decision {p.decision_id})")
                except PolicyError:
                    continue  # spent or expired meanwhile: look again
                self.metrics.approvals_used.labels(mode.name).inc()
                v = p.verdict(Kind.ALLOW, decision.rule, decision.message, approval_id=used.id)
                if mode is Mode.BREAK_GLASS_ONLY:
                    self.audit.submit(self._event("break_glass.used", v, decision, used.id))
                return v
            if decision.outcome is Outcome.APPROVAL_REQUIRED:
                return await self._approval_required(p, who, target, mode, grants, decision, digest)
            return self._finish(p, decision)
        raise _Failure("store.contended", f"the approvals for {target} kept changing while deciding")

    async def _approval_required(self, p: _Progress, who: Identity, target: Target, mode: Mode,
                                 grants: GrantSet, decision: policy.Decision,
                                 digest: str | None) -> Verdict:
        request_id = decision.pending_request_id
        if request_id is None:
            cfg = self.settings.approvals
            try:
                fresh = policy.open_request(
                    request_id=uuid.uuid4().hex, requester=who.principal, target=target, mode=mode,
                    grants=grants, now=self.clock(), pending_ttl=timedelta(seconds=cfg.pending_ttl_s),
                    approval_ttl=timedelta(seconds=cfg.approval_ttl_s), origin="gateway",
                    body_sha256=digest if cfg.bind_to_body else None, max_uses=cfg.max_uses)
            except PolicyError as e:  # decide() said they may ask; be safe anyway
                return self._deny(p.verdict(Kind.DENY, decision.rule, str(e)))
            request, _created = await self._io("get_or_create_pending",
                                               self.store.get_or_create_pending, fresh,
                                               actor=who.principal)
            request_id = request.id
        url = f"{self.settings.approvals.base_url}/requests/{request_id}"
        role = _ADVICE_ROLE[mode].format(service=target.service)
        advice = (f"Open the link, give your reason{' and incident reference' if mode is Mode.BREAK_GLASS_ONLY else ''}"
                  f", ask {role} to approve (mpa approve {request_id}), then repeat the call")
        if not policy.approvers_for(who.principal, target.service, mode, grants, self.clock()):
            # Say so now rather than let the requester wait for a reviewer who cannot exist.
            advice = (f"nobody can approve this request now: no {role.removeprefix('another ')} "
                      "other than you holds that role; ask an operator to grant it (mpactl grants "
                      "add, or the service's owners in the catalog), then open the link")
        v = p.verdict(Kind.APPROVAL_REQUIRED, decision.rule, decision.message, advice,
                      request_id=request_id, request_url=url)
        self.audit.submit(self._event("decision.approval_required", v, decision, request_id))
        return v

    # --- helpers ----------------------------------------------------------------------------

    def _finish(self, p: _Progress, decision: policy.Decision) -> Verdict:
        if decision.outcome is Outcome.ALLOW:
            v = p.verdict(Kind.ALLOW, decision.rule, decision.message)
            if self.settings.audit.allows:
                # The event is built by the writer, off the hot path, with the decision's time.
                self.audit.submit(functools.partial(self._event, "decision.allow", v, decision,
                                                    at=self.clock()))
            return v
        return self._deny(p.verdict(Kind.DENY, decision.rule, decision.message,
                                    _deny_advice(decision.rule, p.target)))

    def _dry_run(self, v: Verdict) -> Verdict:
        """Dry-run rollout (extauthz/dry_run.py): a refusal on a dry-run route is audited as
        decided, then logged, counted and answered as an allow. Errors stay errors."""
        shadow = shadow_label(v.kind.value, v.dry_run, v.rule)
        if shadow is None:
            return v
        self.metrics.dry_run.labels(shadow, v.mode_name).inc()
        log.warning("dry-run: %s %s on %s (mode %s, rule %s) allowed, not enforced; decision %s",
                    shadow, v.principal, v.target, v.mode_name, v.rule, v.decision_id)
        return dataclasses.replace(v, kind=Kind.ALLOW, shadow=shadow, rule=f"dry_run.{shadow}",
                                   message=f"dry-run, not enforced ({v.rule}): {v.message}")

    def _deny(self, v: Verdict) -> Verdict:
        self.audit.submit(self._event("decision.deny", v))
        return v

    def _audit_error(self, v: Verdict) -> None:
        try:
            self.audit.submit(self._event("decision.error", v))
        except Exception:
            log.exception("could not queue the audit event of decision %s", v.decision_id)

    def _event(self, kind: str, v: Verdict, decision: policy.Decision | None = None,
               request_id: str | None = None, *, at: datetime | None = None) -> AuditEvent:
        detail = {"decision_id": v.decision_id, "rule": v.rule, "mode": v.mode_name}
        if v.mode_source:
            detail["mode_source"] = v.mode_source
        if v.dev:
            detail["dev"] = True
        if v.dry_run:
            detail["dry_run"] = True
        return AuditEvent(kind=kind, actor=v.principal or "-", at=at or self.clock(),
                          request_id=request_id or v.request_id or v.approval_id,
                          service=v.target.service if v.target else None,
                          method=v.target.method if v.target else None,
                          outcome=v.kind.value, reason=v.message[:500], detail=detail,
                          id=audit_event_id())

    async def _io(self, op: str, fn, *args, **kwargs):
        """Run a blocking store call off the event loop; any failure is a ``_Failure``."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))
        except PolicyError:
            raise
        except Exception as e:
            self.metrics.store_errors.labels(op).inc()
            log.error("store %s failed: %s", op, e)
            raise _Failure("store.unavailable", f"the approval store failed ({op}): {e}") from e


def audit_event_id() -> str:
    """A unique audit event id, 32 hex digits like the default uuid4, but time-ordered:
    48 bits of milliseconds, then 80 random bits. Consecutive events then land next to
    each other in the store's unique index on ``id`` instead of on random pages, which
    makes batched audit writes about 40% cheaper (and ids sort by time)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def _deny_advice(rule: str, target: Target | None) -> str:
    service = target.service if target else "the service"
    if rule == "principal.not_engineer":
        return "only engineers may call RPCs by hand; ask for an engineer grant if you need one"
    if rule.endswith("not_contributor"):
        return (f"ask a contributor of {service} to make the call, or to add you to the team "
                "that owns it")
    if rule.endswith("not_security_oncall"):
        return "ask the security on-call engineer to make the call under an incident"
    return "ask the service's owners which mode this method should have"
