"""A credential request: the policy's ApprovalRequest plus what the credentials are for.

The policy core scopes an approval to (service, method) and optionally a body digest. Here the
service is ``credentials.aws`` or ``credentials.kubernetes`` and the digest is over the exact
target (role, or cluster and groups) and duration, so an approval is for precisely what the
reviewer saw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from policy import Approval, ApprovalRequest, Mode, RequestState

AWS_SERVICE, AWS_METHOD = "credentials.aws", "AssumeRole"
K8S_SERVICE, K8S_METHOD = "credentials.kubernetes", "IdToken"


@dataclasses.dataclass(frozen=True)
class CredentialTarget:
    """``kind`` is "aws" (``name`` = role) or "kubernetes" (``name`` = cluster, with ``groups``)."""

    kind: str
    name: str
    groups: tuple[str, ...] = ()
    duration_seconds: int = 0

    @property
    def service(self) -> str:
        return AWS_SERVICE if self.kind == "aws" else K8S_SERVICE

    @property
    def method(self) -> str:
        return AWS_METHOD if self.kind == "aws" else K8S_METHOD

    def digest(self) -> str:
        body = json.dumps([self.kind, self.name, sorted(self.groups), self.duration_seconds])
        return hashlib.sha256(body.encode()).hexdigest()

    def describe(self) -> str:
        if self.kind == "aws":
            return f"AWS role {self.name}"
        return f"Kubernetes cluster {self.name} as {', '.join(self.groups)}"


@dataclasses.dataclass(frozen=True)
class CredentialRequest:
    request: ApprovalRequest
    target: CredentialTarget

    @property
    def id(self) -> str:
        return self.request.id

    def to_json(self) -> bytes:
        r = self.request
        body = {
            "target": dataclasses.asdict(self.target),
            "request": {
                "id": r.id, "requester": r.requester, "service": r.service, "method": r.method,
                "mode": r.mode.name, "created_at": r.created_at.isoformat(),
                "expires_at": r.expires_at.isoformat(), "approval_ttl": r.approval_ttl.total_seconds(),
                "reason": r.reason, "incident": r.incident, "body_sha256": r.body_sha256,
                "required_approvals": r.required_approvals, "max_uses": r.max_uses, "uses": r.uses,
                "state": r.state.value,
                "approvals": [{"approver": a.approver, "at": a.at.isoformat(), "comment": a.comment}
                              for a in r.approvals],
                "valid_until": r.valid_until.isoformat() if r.valid_until else None,
                "closed_by": r.closed_by, "closed_at": r.closed_at.isoformat() if r.closed_at else None,
                "close_reason": r.close_reason, "origin": r.origin,
            },
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CredentialRequest:
        body = json.loads(data)
        t = body["target"]
        target = CredentialTarget(t["kind"], t["name"], tuple(t["groups"]), t["duration_seconds"])
        r: dict[str, Any] = dict(body["request"])
        ts = datetime.fromisoformat
        request = ApprovalRequest(
            id=r["id"], requester=r["requester"], service=r["service"], method=r["method"],
            mode=Mode[r["mode"]], created_at=ts(r["created_at"]), expires_at=ts(r["expires_at"]),
            approval_ttl=timedelta(seconds=r["approval_ttl"]), reason=r["reason"], incident=r["incident"],
            body_sha256=r["body_sha256"], required_approvals=r["required_approvals"],
            max_uses=r["max_uses"], uses=r["uses"], state=RequestState(r["state"]),
            approvals=tuple(Approval(a["approver"], ts(a["at"]), a["comment"]) for a in r["approvals"]),
            valid_until=ts(r["valid_until"]) if r["valid_until"] else None,
            closed_by=r["closed_by"], closed_at=ts(r["closed_at"]) if r["closed_at"] else None,
            close_reason=r["close_reason"], origin=r["origin"])
        if request.body_sha256 != target.digest():
            raise ValueError(f"request {request.id}: target does not match the approved digest")
        return cls(request, target)
