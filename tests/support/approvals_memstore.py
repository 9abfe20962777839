"""TEMPORARY in-memory Store used until policy.stores (SQLite) lands on main."""
from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timezone

from policy import RequestState, UnknownRequest
from policy.audit import AuditEvent


class MemStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._reqs: dict = {}
        self._grants: dict = {}
        self._audit: list = []
        self._rev = 0

    def list_grants(self):
        return list(self._grants.values())

    def grants_revision(self):
        return self._rev

    def put_grant(self, g):
        with self._lock:
            self._grants[g.key] = g
            self._rev += 1

    def create_request(self, r, *, actor):
        with self._lock:
            self._reqs[r.id] = r
            self._ev("request.created", actor, r)
            return r

    def get_or_create_pending(self, r, *, actor):
        with self._lock:
            for o in self._reqs.values():
                if (o.state is RequestState.PENDING and o.requester == r.requester and o.service == r.service
                        and o.method == r.method and o.body_sha256 == r.body_sha256 and o.mode == r.mode):
                    return o, False
            return self.create_request(r, actor=actor), True

    def get_request(self, rid):
        try:
            return self._reqs[rid]
        except KeyError:
            raise UnknownRequest(rid) from None

    def find_requests(self, *, requester=None, service=None, method=None, states=None, limit=100):
        out = [r for r in self._reqs.values() if (requester is None or r.requester == requester)
               and (states is None or r.state in states)]
        return sorted(out, key=lambda r: r.created_at, reverse=True)[:limit]

    def update_request(self, rid, change, *, actor, kind, reason=""):
        with self._lock:
            r = change(self.get_request(rid))
            self._reqs[rid] = r
            self._ev(kind, actor, r, reason)
            return r

    def _ev(self, kind, actor, r, reason=""):
        self._audit.append(AuditEvent(kind=kind, actor=actor, at=datetime.now(timezone.utc),
                                      request_id=r.id, service=r.service, method=r.method,
                                      outcome=r.state.value, reason=reason))

    def append_audit(self, e):
        self._audit.append(e)

    def list_audit(self, *, since=None, kinds=None, service=None, limit=1000):
        return [e for e in self._audit if (since is None or e.at >= since)
                and (kinds is None or e.kind in kinds)][:limit]

    def close(self):
        pass
