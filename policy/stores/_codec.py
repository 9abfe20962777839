"""Turning policy values into table rows and back, shared by every SQL adapter.

Adapters differ only in how they carry timestamps and JSON (SQLite: text; PostgreSQL:
timestamptz and jsonb); they pass those conversions in as ``ts``/``json`` callables.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ..audit import AuditEvent
from ..model import Approval, ApprovalRequest, Grant, RequestState, Role
from ..modes import Mode

UTC = UTC

#: Request columns in table order (``seq`` is assigned by the database).
REQUEST_COLUMNS = (
    "id", "requester", "service", "method", "mode", "created_at", "expires_at",
    "approval_ttl_us", "reason", "incident", "body_sha256", "required_approvals", "max_uses",
    "uses", "state", "approvals", "valid_until", "closed_by", "closed_at", "close_reason",
    "origin",
)

AUDIT_COLUMNS = (
    "id", "kind", "actor", "at", "request_id", "service", "method", "outcome", "reason",
    "detail", "trace_id",
)

GRANT_COLUMNS = ("principal", "role", "service", "expires_at", "source")


def utc(dt: datetime) -> datetime:
    """``dt`` in UTC; naive datetimes are refused because their meaning is a guess."""
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}: stores need timezone-aware times")
    return dt.astimezone(UTC)


def _opt(value: Any, f: Callable[[Any], Any]) -> Any:
    return None if value is None else f(value)


def request_params(r: ApprovalRequest, ts: Callable[[datetime], Any],
                   json_in: Callable[[Any], Any]) -> dict[str, Any]:
    approvals = [{"approver": a.approver, "at": utc(a.at).isoformat(), "comment": a.comment}
                 for a in r.approvals]
    return {
        "id": r.id, "requester": r.requester, "service": r.service, "method": r.method,
        "mode": int(r.mode), "created_at": ts(r.created_at), "expires_at": ts(r.expires_at),
        "approval_ttl_us": r.approval_ttl // timedelta(microseconds=1),
        "reason": r.reason, "incident": r.incident, "body_sha256": r.body_sha256,
        "required_approvals": r.required_approvals, "max_uses": r.max_uses, "uses": r.uses,
        "state": r.state.value, "approvals": json_in(approvals),
        "valid_until": _opt(r.valid_until, ts), "closed_by": r.closed_by,
        "closed_at": _opt(r.closed_at, ts), "close_reason": r.close_reason, "origin": r.origin,
    }


def request_from_row(row: Mapping[str, Any], dt: Callable[[Any], datetime],
                     json_out: Callable[[Any], Any]) -> ApprovalRequest:
    approvals = tuple(Approval(a["approver"], datetime.fromisoformat(a["at"]), a["comment"])
                      for a in json_out(row["approvals"]))
    return ApprovalRequest(
        id=row["id"], requester=row["requester"], service=row["service"], method=row["method"],
        mode=Mode(row["mode"]), created_at=dt(row["created_at"]), expires_at=dt(row["expires_at"]),
        approval_ttl=timedelta(microseconds=row["approval_ttl_us"]), reason=row["reason"],
        incident=row["incident"], body_sha256=row["body_sha256"],
        required_approvals=row["required_approvals"], max_uses=row["max_uses"], uses=row["uses"],
        state=RequestState(row["state"]), approvals=approvals,
        valid_until=_opt(row["valid_until"], dt), closed_by=row["closed_by"],
        closed_at=_opt(row["closed_at"], dt), close_reason=row["close_reason"],
        origin=row["origin"],
    )


def grant_params(g: Grant, ts: Callable[[datetime], Any]) -> dict[str, Any]:
    return {"principal": g.principal, "role": g.role.value, "service": g.service or "",
            "expires_at": _opt(g.expires_at, ts), "source": g.source}


def grant_from_row(row: Mapping[str, Any], dt: Callable[[Any], datetime]) -> Grant:
    return Grant(principal=row["principal"], role=Role(row["role"]),
                 service=row["service"] or None, expires_at=_opt(row["expires_at"], dt),
                 source=row["source"])


def audit_params(e: AuditEvent, ts: Callable[[datetime], Any],
                 json_in: Callable[[Any], Any]) -> dict[str, Any]:
    return {"id": e.id, "kind": e.kind, "actor": e.actor, "at": ts(e.at),
            "request_id": e.request_id, "service": e.service, "method": e.method,
            "outcome": e.outcome, "reason": e.reason, "detail": json_in(e.detail),
            "trace_id": e.trace_id}


def audit_from_row(row: Mapping[str, Any], dt: Callable[[Any], datetime],
                   json_out: Callable[[Any], Any]) -> AuditEvent:
    return AuditEvent(kind=row["kind"], actor=row["actor"], at=dt(row["at"]),
                      request_id=row["request_id"], service=row["service"], method=row["method"],
                      outcome=row["outcome"], reason=row["reason"],
                      detail=json_out(row["detail"]), trace_id=row["trace_id"], id=row["id"])


def grant_detail(g: Grant) -> dict[str, Any]:
    """What a grant.added / grant.removed audit event records about the grant."""
    return {"principal": g.principal, "role": g.role.value, "service": g.service,
            "source": g.source,
            "expires_at": None if g.expires_at is None else utc(g.expires_at).isoformat()}
