"""Plain data the policy core works on: principals, grants, targets, requests, decisions.

All types are frozen dataclasses so a decision can never change what it was given.
Times are timezone-aware UTC ``datetime`` values passed in by the caller.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from datetime import datetime, timedelta

from .modes import Mode
from .rules import Rule, message

#: A gRPC name's identifier (a package part, a service, a method).
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
#: A service name (identifiers joined by dots, e.g. ``package.Service``) and a method name, as
#: a ``Target`` holds them: the one definition the path parser, the fast path's compiler and
#: the reflection endpoints use too. Use with ``fullmatch``: ``$`` with ``match`` would let a
#: trailing newline in ("Method\n" must be refused, not authorised as "Method").
SERVICE_NAME = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
METHOD_NAME = re.compile(_IDENT)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Role(str, enum.Enum):
    """Roles a grant can give. CONTRIBUTOR is scoped to one service. AUDITOR decides nothing at
    the gateway: it lets the approvals service show its holder every request (read scopes)."""

    ENGINEER = "engineer"
    CONTRIBUTOR = "contributor"
    SECURITY_ONCALL = "security_oncall"
    AUDITOR = "auditor"


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """``principal`` holds ``role`` (for CONTRIBUTOR: of ``service``) until ``expires_at``.

    ``source`` says who manages the grant ("manual", "sync:catalog", "sync:oncall"), so a
    sync can replace exactly its own grants and leave hand-made ones alone.
    """

    principal: str
    role: Role
    service: str | None = None
    expires_at: datetime | None = None
    source: str = "manual"

    def __post_init__(self) -> None:
        if not self.principal:
            raise ValueError("a grant needs a principal")
        if self.role is Role.CONTRIBUTOR and not self.service:
            raise ValueError("a contributor grant needs the service it applies to")
        if self.role is not Role.CONTRIBUTOR and self.service:
            article = "an" if self.role.value[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.role.value} grant is not scoped to a service")

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of a grant: one row per (principal, role, service)."""
        return (self.principal, self.role.value, self.service or "")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """The RPC being called: ``/service/method`` with the fully-qualified service name."""

    service: str
    method: str

    def __post_init__(self) -> None:
        if not SERVICE_NAME.fullmatch(self.service):
            raise ValueError(f"not a fully-qualified gRPC service name: {self.service!r}")
        if not METHOD_NAME.fullmatch(self.method):
            raise ValueError(f"not a gRPC method name: {self.method!r}")

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def __str__(self) -> str:
        return self.path


class RequestState(str, enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def closed(self) -> bool:
        return self in (RequestState.REJECTED, RequestState.CANCELLED, RequestState.EXPIRED)


@dataclasses.dataclass(frozen=True, slots=True)
class Approval:
    approver: str
    at: datetime
    comment: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """A multi-party authorisation request for one principal to call one RPC.

    Scope is (service, method) and, when ``body_sha256`` is set, the exact request
    body with that digest. ``expires_at`` bounds how long it may stay pending;
    once approved it is usable until ``valid_until`` and at most ``max_uses`` times.
    ``origin`` is "gateway" for requests the gateway opened on a denied call (they wait
    for the requester to give a reason) and "user" for ones made deliberately.
    """

    id: str
    requester: str
    service: str
    method: str
    mode: Mode
    created_at: datetime
    expires_at: datetime
    approval_ttl: timedelta = timedelta(hours=1)
    reason: str = ""
    incident: str | None = None
    body_sha256: str | None = None
    required_approvals: int = 1
    max_uses: int | None = None
    uses: int = 0
    state: RequestState = RequestState.PENDING
    approvals: tuple[Approval, ...] = ()
    valid_until: datetime | None = None
    closed_by: str | None = None
    closed_at: datetime | None = None
    close_reason: str = ""
    origin: str = "user"

    def __post_init__(self) -> None:
        Target(self.service, self.method)  # validates both names
        if not self.mode.needs_approval:
            raise ValueError(f"{self.mode.name} does not take approvals")
        if self.body_sha256 is not None and not _SHA256_HEX.fullmatch(self.body_sha256):
            raise ValueError("body_sha256 must be 64 lowercase hex characters")
        if self.required_approvals < 1:
            raise ValueError("required_approvals must be at least 1")
        if self.max_uses is not None and self.max_uses < 1:
            raise ValueError("max_uses must be at least 1 when set")
        if self.approval_ttl <= timedelta(0):
            raise ValueError("approval_ttl must be positive")

    @property
    def target(self) -> Target:
        return Target(self.service, self.method)

    @property
    def approvers(self) -> tuple[str, ...]:
        return tuple(a.approver for a in self.approvals)


class Outcome(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What ``decide()`` concluded and why.

    ``rule`` is a registered id (``policy.rules.Rule``) for logs and metrics; ``facts``
    are what it was decided on (principal, target, mode, ...), from which ``message``, the
    sentence a caller reads, is worded (``policy.rules``). For an allow through an approval,
    ``approval_id`` names it; for APPROVAL_REQUIRED, ``pending_request_id`` names an open
    request to reuse (if any).
    """

    outcome: Outcome
    mode: Mode
    rule: Rule
    facts: Mapping[str, object] = dataclasses.field(default_factory=dict)
    approval_id: str | None = None
    pending_request_id: str | None = None

    @property
    def message(self) -> str:
        """What was decided and why, in words (built on demand: allows rarely need it)."""
        return message(self.rule, self.facts)

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW
