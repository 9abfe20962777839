"""JSON shapes of the approvals API (pydantic models; they make the OpenAPI spec)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from policy import ApprovalRequest

from .service import MODE_EXPLANATIONS, Permissions, approver_words, awaiting_reason, routing_note


class CreateRequestIn(BaseModel):
    """Ask for approval to call one RPC (optionally with one exact request body)."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(description="fully-qualified gRPC service, e.g. pkg.v1.Ledger",
                         max_length=255,
                         pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    method: str = Field(description="method name, e.g. AdjustBalance", max_length=255,
                        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    reason: str = Field(description="why you need this call (reviewers read it); the server's "
                                    "configured minimum length applies", min_length=1,
                        max_length=2000)
    incident: str | None = Field(default=None, max_length=200,
                                 description="incident reference (required for BREAK_GLASS_ONLY)")
    body_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                    description="bind the approval to this exact request body")
    body_json: dict[str, Any] | None = Field(
        default=None, description="bind the approval to this exact request message, given as "
                                  "JSON (proto3 JSON mapping); the server encodes it with the "
                                  "method's input type from reflection (not with body_sha256)")
    duration_seconds: int | None = Field(default=None, ge=1,
                                         description="how long the approval lasts once granted")
    max_uses: int | None = Field(default=None, ge=1, description="how many calls it allows")


class CompleteIn(BaseModel):
    """Give the reason for a request the gateway opened."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    incident: str | None = Field(default=None, max_length=200)


class CommentIn(BaseModel):
    """Optional words with an approval, rejection or cancellation."""

    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="", max_length=2000)


class ApprovalOut(BaseModel):
    approver: str
    at: datetime
    comment: str


class PermissionsOut(BaseModel):
    can_approve: bool
    can_reject: bool
    can_cancel: bool
    can_complete: bool
    why_not: str = Field(description="why the caller may not review, in words; empty if they may")


class RequestOut(BaseModel):
    """An approval request as the caller sees it."""

    id: str
    url: str = Field(description="the approval page for this request")
    requester: str
    service: str
    method: str
    path: str
    mode: str
    why_approval: str
    approver_rule: str
    eligible_approvers: list[str] = Field(description="who may approve it now, from the grants "
                                                      "(the requester and past approvers excluded)")
    routing_note: str = Field(description="non-empty when too few people can approve it: what "
                                          "the requester should do")
    state: str
    awaiting_reason: bool
    origin: str
    reason: str
    incident: str | None
    body_sha256: str | None
    body_view: str | None = Field(description="the bound call's message type and body as JSON, "
                                               "fields marked debug_redact masked, size-capped "
                                               "(null when unbound or not known)")
    created_at: datetime
    expires_at: datetime
    approval_ttl_seconds: int
    valid_until: datetime | None
    required_approvals: int
    approvals: list[ApprovalOut]
    max_uses: int | None
    uses: int
    closed_by: str | None
    closed_at: datetime | None
    close_reason: str
    you: PermissionsOut

    @classmethod
    def build(cls, r: ApprovalRequest, url: str, perms: Permissions,
              eligible: tuple[str, ...] = (), body_view: str | None = None) -> RequestOut:
        return cls(
            id=r.id, url=url, requester=r.requester, service=r.service, method=r.method,
            path=f"/{r.service}/{r.method}", mode=r.mode.name,
            why_approval=MODE_EXPLANATIONS[r.mode], approver_rule=approver_words(r),
            eligible_approvers=list(eligible), routing_note=routing_note(r, eligible),
            state=r.state.value, awaiting_reason=awaiting_reason(r), origin=r.origin,
            reason=r.reason, incident=r.incident, body_sha256=r.body_sha256, body_view=body_view,
            created_at=r.created_at, expires_at=r.expires_at,
            approval_ttl_seconds=int(r.approval_ttl.total_seconds()), valid_until=r.valid_until,
            required_approvals=r.required_approvals,
            approvals=[ApprovalOut(approver=a.approver, at=a.at, comment=a.comment)
                       for a in r.approvals],
            max_uses=r.max_uses, uses=r.uses, closed_by=r.closed_by, closed_at=r.closed_at,
            close_reason=r.close_reason,
            you=PermissionsOut(can_approve=perms.can_approve, can_reject=perms.can_reject,
                               can_cancel=perms.can_cancel, can_complete=perms.can_complete,
                               why_not=perms.why_not))


class RequestListOut(BaseModel):
    requests: list[RequestOut]


class WhoAmIOut(BaseModel):
    principal: str
    name: str | None
    roles: list[str] = Field(description="active grants, e.g. engineer, contributor:pkg.Svc")


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. self_approval")
    message: str = Field(description="what was wrong, in words")


class ErrorOut(BaseModel):
    error: ErrorBody


class DevTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=200, pattern=r"^\S+$",
                         description="the engineer to sign in as (dev issuer only)")


class DevTokenOut(BaseModel):
    token: str
