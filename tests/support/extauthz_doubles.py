"""Small in-memory stand-ins for the ext_authz server's unit tests.

``MemoryStore`` keeps the Store protocol's semantics that the pipeline relies on
(atomic update_request with its audit event, get_or_create_pending reuse) with a lock;
``StaticModes`` is a ModeSource from a fixed map, with switches to make it fail or stall.
The end-to-end tests use the real stores and real reflection instead.
"""
from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone

from policy import ApprovalRequest, GrantSet, RequestState, StoreError, UnknownRequest
from policy.audit import AuditEvent
from reflection_cache.types import ReflectionError, ServiceModes, UnknownService


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, ApprovalRequest] = {}
        self.audit: list[AuditEvent] = []
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise StoreError("store is down (test switch)")

    def get_request(self, request_id: str) -> ApprovalRequest:
        self._up()
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequest(request_id) from None

    def find_requests(self, *, requester=None, service=None, method=None, states=None, limit=100):
        self._up()
        out = [r for r in self.requests.values()
               if (requester is None or r.requester == requester)
               and (service is None or r.service == service)
               and (method is None or r.method == method)
               and (states is None or r.state in states)]
        return sorted(out, key=lambda r: r.created_at, reverse=True)[:limit]

    def create_request(self, request, *, actor):
        self._up()
        with self._lock:
            self.requests[request.id] = request
            self.audit.append(AuditEvent("request.created", actor, _now(), request_id=request.id))
        return request

    def get_or_create_pending(self, request, *, actor):
        self._up()
        with self._lock:
            for r in self.requests.values():
                if (r.state is RequestState.PENDING and r.requester == request.requester
                        and r.service == request.service and r.method == request.method
                        and r.body_sha256 == request.body_sha256):
                    return r, False
            self.requests[request.id] = request
            self.audit.append(AuditEvent("request.created", actor, _now(), request_id=request.id))
            return request, True

    def update_request(self, request_id, change, *, actor, kind, reason=""):
        self._up()
        with self._lock:
            new = change(self.requests[request_id])
            self.requests[request_id] = new
            self.audit.append(AuditEvent(kind, actor, _now(), request_id=request_id, reason=reason))
            return new

    def append_audit(self, event: AuditEvent) -> None:
        self._up()
        with self._lock:
            self.audit.append(event)

    def close(self) -> None:
        pass


class FixedGrants:
    def __init__(self, grants: GrantSet) -> None:
        self.grants = grants

    def current(self) -> GrantSet:
        return self.grants


class StaticModes:
    """A ModeSource from ``{service: ServiceModes}``; ``fail``/``delay`` simulate trouble."""

    def __init__(self, services: dict[str, ServiceModes]) -> None:
        self.services = services
        self.fail: ReflectionError | None = None
        self.delay = 0.0
        self.calls = 0

    async def get(self, service: str) -> ServiceModes:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        try:
            return self.services[service]
        except KeyError:
            raise UnknownService(f"no reflection knows {service}") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)
