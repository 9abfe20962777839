"""An approved request made through the real store, for approval-mode callers of a scenario."""
from __future__ import annotations

from datetime import UTC, datetime

import policy
from policy import GrantSet, Mode, Target


def approved_request(store_url: str, *, requester: str, approver: str, service: str, method: str,
                     max_uses: int, mode: Mode = Mode.ENGINEERS_WITH_APPROVAL) -> str:
    """Open a request for ``requester`` on ``service/method``, approved by ``approver``, good for
    ``max_uses`` calls. Returns its id."""
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        grants = GrantSet(store.list_grants())
        now = datetime.now(UTC)
        r = policy.open_request(request_id=f"fault-{now.strftime('%H%M%S%f')}", requester=requester,
                                target=Target(service, method), mode=mode, grants=grants, now=now,
                                reason="fault suite: calls under a fault", max_uses=max_uses)
        store.create_request(policy.approve(r, approver, grants, now), actor=requester)
        return r.id
    finally:
        store.close()


def uses_spent(store_url: str, request_id: str) -> int:
    from policy.stores import open_store

    store = open_store(store_url)
    try:
        return store.get_request(request_id).uses
    finally:
        store.close()
