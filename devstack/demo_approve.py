"""What the approval page does, for the demo's command line: complete and approve a request."""
from __future__ import annotations

from datetime import UTC, datetime

import policy
from policy import GrantSet


def approve_request(store_url: str, request_id: str, approver: str, *, reason: str = "demo",
                    incident: str | None = None) -> str:
    """Give a gateway-opened request its reason (as its requester), then approve it as ``approver``."""
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        now = datetime.now(UTC)
        grants = GrantSet(store.list_grants())
        r = store.get_request(request_id)
        # Check the whole step first, so a refused approval changes nothing (not even the reason).
        check = policy.complete(r, r.requester, now, reason=reason, incident=incident) \
            if r.origin == "gateway" else r
        policy.approve(check, approver, grants, now)
        if r.origin == "gateway":
            r = store.update_request(request_id, lambda x: policy.complete(
                x, x.requester, now, reason=reason, incident=incident),
                actor=r.requester, kind="request.completed", reason=reason)
        r = store.update_request(request_id, lambda x: policy.approve(x, approver, grants, now),
                                 actor=approver, kind="request.approved")
        return (f"request {r.id} by {r.requester} for /{r.service}/{r.method}: {r.state.value}"
                + (f" until {r.valid_until.isoformat(timespec='seconds')}" if r.valid_until else ""))
    finally:
        store.close()
