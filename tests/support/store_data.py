"""Shared test data for the store tests: grants for a small org and a request factory."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime

from policy import ApprovalRequest, Grant, GrantSet, Mode, Role, Target, open_request

NOW = datetime.now(UTC).replace(microsecond=123456)
SVC = "pay.v1.Payments"
TARGET = Target(SVC, "Refund")

GRANTS = GrantSet([
    *(Grant(p, Role.ENGINEER) for p in ("alice", "bob", "carol", "dave", "erin")),
    Grant("alice", Role.CONTRIBUTOR, SVC), Grant("bob", Role.CONTRIBUTOR, SVC),
    Grant("carol", Role.CONTRIBUTOR, SVC),
    Grant("dave", Role.SECURITY_ONCALL), Grant("erin", Role.SECURITY_ONCALL),
])


def new_request(requester: str = "alice", *, mode: Mode = Mode.CONTRIBUTORS_WITH_APPROVAL,
                target: Target = TARGET, now: datetime = NOW, **kw) -> ApprovalRequest:
    return open_request(request_id=uuid.uuid4().hex, requester=requester, target=target,
                        mode=mode, grants=GRANTS, now=now, reason="fix stuck refund", **kw)
