"""The registry of rule ids, and the one place their wording lives.

Every decision (``policy.decide()``'s and the gateway's own: identity, target, dependency
failures, dry-run) names a ``Rule``. A rule id is stable: it is a metric label, an audit
field and part of the text callers read, so nothing builds one from pieces. What a caller
is told (the message, and the advice on what to do) is ``explain(rule, facts)``: a template
per rule, filled from structured facts (principal, target, mode, request id...) and the
mode's words in ``policy.mode_facts``.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .modes import Mode

if TYPE_CHECKING:
    from .mode_facts import ModeFacts


class Rule(enum.StrEnum):
    """Every rule a decision can name. The value is the id callers, logs and metrics see."""

    # decide(): policy
    MODE_UNSPECIFIED = "mode.unspecified"
    PRINCIPAL_NOT_ENGINEER = "principal.not_engineer"
    ENGINEERS_WITHOUT_APPROVAL_ENGINEER = "engineers_without_approval.engineer"
    CONTRIBUTORS_WITHOUT_APPROVAL_CONTRIBUTOR = "contributors_without_approval.contributor"
    CONTRIBUTORS_WITHOUT_APPROVAL_NOT_CONTRIBUTOR = "contributors_without_approval.not_contributor"
    CONTRIBUTORS_WITH_APPROVAL_NOT_CONTRIBUTOR = "contributors_with_approval.not_contributor"
    BREAK_GLASS_ONLY_NOT_SECURITY_ONCALL = "break_glass_only.not_security_oncall"
    ENGINEERS_WITH_APPROVAL_APPROVED = "engineers_with_approval.approved"
    CONTRIBUTORS_WITH_APPROVAL_APPROVED = "contributors_with_approval.approved"
    BREAK_GLASS_ONLY_APPROVED = "break_glass_only.approved"
    ENGINEERS_WITH_APPROVAL_APPROVAL_REQUIRED = "engineers_with_approval.approval_required"
    CONTRIBUTORS_WITH_APPROVAL_APPROVAL_REQUIRED = "contributors_with_approval.approval_required"
    BREAK_GLASS_ONLY_APPROVAL_REQUIRED = "break_glass_only.approval_required"
    # the gateway: who and what is called
    IDENTITY_UNVERIFIED = "identity.unverified"
    TARGET_BAD_PATH = "target.bad_path"
    TARGET_NOT_GRPC = "target.not_grpc"
    TARGET_UNKNOWN_SERVICE = "target.unknown_service"
    TARGET_UNKNOWN_METHOD = "target.unknown_method"
    REQUEST_BODY_TOO_LARGE = "request.body_too_large"
    APPROVAL_CANNOT_OPEN = "approval.cannot_open"
    # the gateway: failures to decide (always 503, never an allow)
    REFLECTION_ERROR = "reflection.reflection_error"
    REFLECTION_UNAVAILABLE = "reflection.reflection_unavailable"
    REFLECTION_MALFORMED_DESCRIPTORS = "reflection.malformed_descriptors"
    STORE_UNAVAILABLE = "store.unavailable"
    STORE_CONTENDED = "store.contended"
    DEADLINE_EXCEEDED = "deadline.exceeded"
    INTERNAL_ERROR = "internal.error"
    # dry-run rollout: a refusal let through
    DRY_RUN_WOULD_DENY = "dry_run.would_deny"
    DRY_RUN_WOULD_NEED_APPROVAL = "dry_run.would_need_approval"
    # Envoy's fast path (issue 12): an allow Envoy's RBAC filter decided, audited from its access log
    FAST_PATH_ALLOW = "fast_path.allow"

    @property
    def enforced_in_dry_run(self) -> bool:
        """Dry-run relaxes policy, never who is calling (``identity.*``)."""
        return self is Rule.IDENTITY_UNVERIFIED


#: The facts a rule's wording is filled from (principal, target, mode, request_id, detail...).
Facts = Mapping[str, object]
_Text = str | Callable[[Mapping[str, object]], str]


@dataclasses.dataclass(frozen=True, slots=True)
class Wording:
    """A rule's message (what happened) and advice (what to do), as ``str.format`` templates
    over the facts, or functions of them when the sentence itself depends on a fact."""

    message: _Text
    advice: _Text = ""


def _store_failed(f: Mapping[str, object]) -> str:
    if f["op"] == "grants":
        return f"grants are not available: {f['detail']}"
    return f"the approval store failed ({f['op']}): {f['detail']}"


_ASK_CONTRIBUTOR = ("ask a contributor of {service} to make the call, or to add you to the team "
                    "that owns it")
_NOT_ELIGIBLE = ("{target} is {mode}: only {role_words} may call it, with another's approval, "
                 "and {principal} is not")
_APPROVED = "approved by {approvers} (request {request_id})"
_NEEDS = "{target} is {mode}: it needs {needs}"
_OPEN_THE_LINK = ("Open the link, give your reason{incident_words}, ask {approver_advice} to "
                  "approve (mpa approve {request_id}), then repeat the call")
_NOBODY = ("Nobody can approve this request now: no {approver_role} other than you holds that "
           "role; ask an operator to grant it (mpactl grants add, or the service's owners in "
           "the catalog), then open the link")


def _open_the_link(f: Mapping[str, object]) -> str:
    """What to do next; when nobody could approve (fact ``nobody_can_approve``), say so now."""
    if f.get("nobody_can_approve"):
        try:  # derived lazily by words(): index, do not .get()
            role = str(f["approver_advice"]).removeprefix("another ")
        except KeyError:
            role = "approver"
        return _NOBODY.format_map({**f, "approver_role": role})
    return _OPEN_THE_LINK.format_map(f)


_STORE_ADVICE = "retry shortly; the gateway's store needs attention"
_REFLECTION = "cannot learn the mode of {target}: {detail}"
_REFLECTION_ADVICE = ("retry shortly; if it persists, the service's reflection endpoint needs "
                      "attention")
_DRY_RUN = Wording("dry-run, not enforced ({decided_rule}): {decided_message}", "{decided_advice}")

WORDING: Mapping[Rule, Wording] = {
    Rule.MODE_UNSPECIFIED: Wording(
        "no humans_who_can_rpc mode could be resolved for {target}",
        "ask the service's owners which mode this method should have"),
    Rule.PRINCIPAL_NOT_ENGINEER: Wording(
        "{principal} holds no engineer grant, so may not call {target} by hand",
        "only engineers may call RPCs by hand; ask for an engineer grant if you need one"),
    Rule.ENGINEERS_WITHOUT_APPROVAL_ENGINEER: Wording("{target} is open to every engineer"),
    Rule.CONTRIBUTORS_WITHOUT_APPROVAL_CONTRIBUTOR: Wording("{principal} contributes to {service}"),
    Rule.CONTRIBUTORS_WITHOUT_APPROVAL_NOT_CONTRIBUTOR: Wording(
        "{target} is CONTRIBUTORS_WITHOUT_APPROVAL and {principal} is not a contributor of "
        "{service}", _ASK_CONTRIBUTOR),
    Rule.CONTRIBUTORS_WITH_APPROVAL_NOT_CONTRIBUTOR: Wording(_NOT_ELIGIBLE, _ASK_CONTRIBUTOR),
    Rule.BREAK_GLASS_ONLY_NOT_SECURITY_ONCALL: Wording(
        _NOT_ELIGIBLE, "ask the security on-call engineer to make the call under an incident"),
    Rule.ENGINEERS_WITH_APPROVAL_APPROVED: Wording(_APPROVED),
    Rule.CONTRIBUTORS_WITH_APPROVAL_APPROVED: Wording(_APPROVED),
    Rule.BREAK_GLASS_ONLY_APPROVED: Wording(_APPROVED),
    Rule.ENGINEERS_WITH_APPROVAL_APPROVAL_REQUIRED: Wording(_NEEDS, _open_the_link),
    Rule.CONTRIBUTORS_WITH_APPROVAL_APPROVAL_REQUIRED: Wording(_NEEDS, _open_the_link),
    Rule.BREAK_GLASS_ONLY_APPROVAL_REQUIRED: Wording(_NEEDS, _open_the_link),
    Rule.IDENTITY_UNVERIFIED: Wording(
        "{detail}", "log in (mpa login) and send your token as 'authorization: Bearer ...'"),
    Rule.TARGET_BAD_PATH: Wording("{detail}", "call a gRPC method as /package.Service/Method"),
    Rule.TARGET_NOT_GRPC: Wording("HTTP method {http_method} is not a gRPC call",
                                  "use a gRPC client (gRPC calls are HTTP/2 POST)"),
    Rule.TARGET_UNKNOWN_SERVICE: Wording("{detail}", "check the service and method name"),
    Rule.TARGET_UNKNOWN_METHOD: Wording("{detail}", "check the service and method name"),
    Rule.REQUEST_BODY_TOO_LARGE: Wording(
        "the request body is {size} bytes; the gateway inspects at most {limit}",
        "send a smaller request, or ask the gateway operators to raise "
        "with_request_body.max_request_bytes"),
    Rule.APPROVAL_CANNOT_OPEN: Wording("{detail}"),
    Rule.REFLECTION_ERROR: Wording(_REFLECTION, _REFLECTION_ADVICE),
    Rule.REFLECTION_UNAVAILABLE: Wording(_REFLECTION, _REFLECTION_ADVICE),
    Rule.REFLECTION_MALFORMED_DESCRIPTORS: Wording(_REFLECTION, _REFLECTION_ADVICE),
    Rule.STORE_UNAVAILABLE: Wording(_store_failed, _STORE_ADVICE),
    Rule.STORE_CONTENDED: Wording("the approvals for {target} kept changing while deciding",
                                  _STORE_ADVICE),
    Rule.DEADLINE_EXCEEDED: Wording("no decision within {deadline_ms} ms",
                                    "retry shortly; if it persists, tell the gateway operators"),
    Rule.INTERNAL_ERROR: Wording(
        "the authorization server failed while deciding",
        "retry; if it persists, tell the gateway operators and quote decision {decision_id}"),
    Rule.DRY_RUN_WOULD_DENY: _DRY_RUN,
    Rule.DRY_RUN_WOULD_NEED_APPROVAL: _DRY_RUN,
    Rule.FAST_PATH_ALLOW: Wording("{target} allowed by the gateway's fast path (policy {policy_id})"),
}

#: The reflection failure rules, by ``ReflectionError.code``.
REFLECTION_RULES: Mapping[str, Rule] = {
    "reflection_unavailable": Rule.REFLECTION_UNAVAILABLE,
    "malformed_descriptors": Rule.REFLECTION_MALFORMED_DESCRIPTORS,
}


def reflection_rule(code: str) -> Rule:
    """The rule of a reflection failure with this error code (an unknown code: the generic one)."""
    return REFLECTION_RULES.get(code, Rule.REFLECTION_ERROR)


class _Words(dict[str, object]):
    """The facts as templates see them: ``mode`` as its name, and what templates derive from
    the facts (``service`` from ``target``; the mode's words from ``policy.mode_facts``)
    computed only when a template asks for it."""

    def __missing__(self, key: str) -> object:
        if key == "service":
            target = self.get("target")
            if target is None:
                raise KeyError(key)
            return target.service  # type: ignore[attr-defined]
        mode = self.get("_mode")
        if not isinstance(mode, Mode):
            raise KeyError(key)
        facts = _mode_facts().get(mode)
        if facts is None:
            raise KeyError(key)
        if key == "role_words":
            return facts.role_words
        if key == "needs":
            return facts.needs
        if key == "incident_words":
            return " and incident reference" if facts.incident_required else ""
        if key == "approver_advice":
            service = self["service"] if "target" in self or "service" in self else "the service"
            return facts.approver_advice.format(service=service)
        raise KeyError(key)


def words(facts: Facts) -> dict[str, object]:
    """The facts plus what templates derive from them (see ``_Words``)."""
    out = _Words(facts)
    mode = out.get("mode")
    if isinstance(mode, Mode):
        out["_mode"] = mode
        out["mode"] = mode.name
    return out


_MODE_FACTS: Mapping[Mode, ModeFacts] | None = None


def _mode_facts() -> Mapping[Mode, ModeFacts]:
    """``policy.mode_facts.MODE_FACTS`` (imported on first use: that module imports this one)."""
    global _MODE_FACTS
    if _MODE_FACTS is None:
        from .mode_facts import MODE_FACTS
        _MODE_FACTS = MODE_FACTS
    return _MODE_FACTS


def _fill(text: _Text, w: Mapping[str, object]) -> str:
    return text(w) if callable(text) else text.format_map(w)


def explain(rule: Rule, facts: Facts) -> tuple[str, str]:
    """``(message, advice)`` for ``rule`` filled from ``facts``."""
    wording = WORDING[rule]
    w = words(facts)
    return _fill(wording.message, w), _fill(wording.advice, w) if wording.advice else ""


def message(rule: Rule, facts: Facts) -> str:
    """What happened, for ``rule`` filled from ``facts``."""
    return _fill(WORDING[rule].message, words(facts))
