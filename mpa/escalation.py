"""On-call escalation for break-glass requests, as PagerDuty Events API v2 events.

An audit exporter like :mod:`mpa.slack`: once a ``BREAK_GLASS_ONLY`` request has its reason (and
incident), it enqueues a ``trigger`` event so security on-call is paged; when the request is
approved, rejected, cancelled or expired it enqueues a ``resolve`` with the same ``dedup_key``.
Events go through the same durable outbox as Slack (a SQLite spool with retries and backoff), so
an outage of the paging service delays pages and loses none. The routing (integration) key is a
secret: it is added only when posting, never written to the spool or logged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from policy import ApprovalRequest, GrantSet, Mode, UnknownRequest, eligible_approvers
from policy.audit import AuditEvent
from policy.store import Store
from rpcauthz.slack_outbox import SlackSpool

from .service import awaiting_reason, utcnow

#: Where PagerDuty's Events API v2 takes events.
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
_OPENING = ("request.created", "request.completed")
_CLOSING = ("request.approved", "request.rejected", "request.cancelled", "request.expired")


def dedup_key(request_id: str) -> str:
    return f"rpcauthz-mpa-{request_id}"


def with_routing_key(routing_key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The delivery hook that adds the routing key at posting time."""
    def prepare(event: dict[str, Any]) -> dict[str, Any]:
        return {"routing_key": routing_key, **event}
    return prepare


class OnCallEscalation:
    """Audit exporter: break-glass requests page security on-call and resolve when closed."""

    def __init__(self, store: Store, spool: SlackSpool, link: Callable[[str], str],
                 source: str = "rpcauthz-approvals") -> None:
        self.store = store
        self.spool = spool
        self.link = link
        self.source = source

    def export(self, events: Sequence[AuditEvent]) -> None:
        for e in events:
            if e.kind not in _OPENING + _CLOSING or not e.request_id:
                continue
            try:
                r = self.store.get_request(e.request_id)
            except UnknownRequest:
                continue
            event = self.event_for(e, r)
            if event is not None:
                self.spool.enqueue(f"{event['event_action']}:{r.id}", event)

    def event_for(self, e: AuditEvent, r: ApprovalRequest) -> dict[str, Any] | None:
        """The Events v2 body (without routing key) for one audit event, or None."""
        if r.mode is not Mode.BREAK_GLASS_ONLY or awaiting_reason(r) or not r.reason:
            return None  # only announced break-glass requests page anyone
        if e.kind in _CLOSING:
            return {"event_action": "resolve", "dedup_key": dedup_key(r.id)}
        link = self.link(r.id)
        rpc = f"/{r.service}/{r.method}"
        eligible = eligible_approvers(r, GrantSet(self.store.list_grants()), utcnow())
        summary = (f"Break-glass approval needed: {r.requester} asks to call {rpc} "
                   f"(incident {r.incident or 'none'})")
        return {
            "event_action": "trigger",
            "dedup_key": dedup_key(r.id),
            "payload": {
                "summary": summary[:1024],
                "source": self.source,
                "severity": "critical",
                "component": r.service,
                "group": "break-glass",
                "class": "approval_request",
                "custom_details": {
                    "request_id": r.id, "requester": r.requester, "rpc": rpc,
                    "incident": r.incident, "reason": r.reason,
                    "required_approvals": r.required_approvals,
                    "eligible_approvers": list(eligible),
                    "expires_at": r.expires_at.isoformat(),
                },
            },
            "client": "rpcauthz approvals",
            "client_url": link,
            "links": [{"href": link, "text": "Review the break-glass request"}],
        }


__all__ = ["OnCallEscalation", "PAGERDUTY_EVENTS_URL", "dedup_key", "with_routing_key"]
