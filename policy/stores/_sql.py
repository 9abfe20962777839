"""The Store operations written once in SQL, for the SQLite and PostgreSQL adapters.

An adapter supplies transactions (``_tx``) and the few dialect differences: how
timestamps and JSON travel, how a request row is locked, how concurrent
``get_or_create_pending`` callers are serialised, and what happens after a grant
change (PostgreSQL NOTIFYs). SQL here uses ``%(name)s`` placeholders; the SQLite
adapter rewrites them to ``:name``.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self

from ..audit import KINDS, AuditEvent
from ..decide import give_back
from ..errors import SpendVoided, UnknownRequest
from ..grant_delta import GrantChange, GrantDelta
from ..model import ApprovalRequest, Grant, RequestState, Role
from ..store import GrantDiff, Subscription, Transition
from . import _codec as codec

_REQ_COLS = ", ".join(codec.REQUEST_COLUMNS)
#: The open states, as the partial index ``requests_open_scope`` states them (word for word:
#: a planner uses a partial index only when the query carries its condition).
OPEN_STATES_SQL = "state IN ('pending', 'approved')"
_OPEN_STATES = frozenset({RequestState.PENDING, RequestState.APPROVED})
#: The gateway's per-call lookup (a caller's open requests for one method) reads this index,
#: in both stores' schemas: only the open rows are in it, so its depth follows the open
#: requests, not the history (issue 13). Its WHERE is ``OPEN_STATES_SQL``, as the query
#: states it. Old programs ignore the index, so it needs no schema version.
OPEN_SCOPE_INDEX = ("CREATE INDEX IF NOT EXISTS requests_open_scope ON requests "
                    f"(requester, service, method, created_at) WHERE {OPEN_STATES_SQL}")
_REQ_VALUES = ", ".join(f"%({c})s" for c in codec.REQUEST_COLUMNS)
#: What a transition may change; identity and scope are fixed at creation.
_MUTABLE = ("reason", "incident", "uses", "state", "approvals", "valid_until", "closed_by",
            "closed_at", "close_reason", "origin", "expires_at", "body_sha256", "max_uses",
            "approval_ttl_us")
_IMMUTABLE = ("id", "requester", "service", "method", "mode", "created_at", "required_approvals")
#: Limits a transition may only narrow, and only before anybody approved (``policy.narrow``).
_NARROWABLE = ("body_sha256", "max_uses", "approval_ttl")


def _only_narrowed(old: ApprovalRequest, new: ApprovalRequest) -> list[str]:
    """The limits ``new`` changed in a way ``policy.narrow`` never would (empty if none)."""
    changed = [f for f in _NARROWABLE if getattr(new, f) != getattr(old, f)]
    if not changed:
        return []
    if old.state is not RequestState.PENDING or old.approvals:
        return changed
    bad = []
    if old.body_sha256 != new.body_sha256 and old.body_sha256 is not None:
        bad.append("body_sha256")
    if old.max_uses != new.max_uses and (new.max_uses is None or
                                         (old.max_uses is not None and new.max_uses > old.max_uses)):
        bad.append("max_uses")
    if new.approval_ttl > old.approval_ttl:
        bad.append("approval_ttl")
    return bad
_AUDIT_COLS = ", ".join(codec.AUDIT_COLUMNS)
_AUDIT_VALUES = ", ".join(f"%({c})s" for c in codec.AUDIT_COLUMNS)
# An event id the store already holds is skipped: replaying a spool of events is idempotent.
_INSERT_AUDIT = f"INSERT INTO audit ({_AUDIT_COLS}) VALUES ({_AUDIT_VALUES}) ON CONFLICT (id) DO NOTHING"
_GRANT_COLS = ", ".join(codec.GRANT_COLUMNS)
_GRANT_VALUES = ", ".join(f"%({c})s" for c in codec.GRANT_COLUMNS)
_UPSERT_GRANT = (f"INSERT INTO grants ({_GRANT_COLS}) VALUES ({_GRANT_VALUES}) "
                 "ON CONFLICT (principal, role, service) DO UPDATE SET "
                 "expires_at = excluded.expires_at, source = excluded.source")
_DELETE_GRANT = ("DELETE FROM grants WHERE principal = %(principal)s AND role = %(role)s "
                 "AND service = %(service)s")
_LOG_CHANGE = (f"INSERT INTO grant_changes (revision, deleted, {_GRANT_COLS}) "
               f"VALUES (%(revision)s, %(deleted)s, {_GRANT_VALUES})")
#: How many grant revisions the change log keeps; a cache further behind reloads everything.
CHANGE_LOG_REVISIONS = 1000
#: Rows per fetch when loading every grant: the loader gives the interpreter lock back
#: between batches, so a full reload does not stall decisions on the same process.
_LOAD_BATCH = 2000


class SqlStore(abc.ABC):
    """Shared implementation of :class:`policy.store.Store` over a DB-API-ish cursor."""

    #: Appended to the SELECT that reads a request inside ``update_request``.
    _FOR_UPDATE = ""

    def __init__(self, label: str) -> None:
        #: Names the store in every error message, e.g. "sqlite store /var/lib/x.db".
        self.label = label

    # --- adapter hooks --------------------------------------------------------------------
    @abc.abstractmethod
    def _tx(self, *, write: bool) -> contextlib.AbstractContextManager[Any]:
        """A transaction yielding a cursor; commits on success, rolls back on any error.

        Driver errors become ``StoreError`` naming ``self.label``; every other exception
        (a ``PolicyError`` from a transition, ``UnknownRequest``) propagates unchanged.
        For ``write=True`` the transaction must hold the write lock from its start
        (SQLite ``BEGIN IMMEDIATE``) or lock rows it reads (PostgreSQL ``FOR UPDATE``).
        """

    @abc.abstractmethod
    def _ts(self, dt: datetime) -> Any: ...

    @abc.abstractmethod
    def _dt(self, value: Any) -> datetime: ...

    @abc.abstractmethod
    def _json_in(self, obj: Any) -> Any: ...

    @abc.abstractmethod
    def _json_out(self, value: Any) -> Any: ...

    def _lock_scope(self, cur: Any, key: str) -> None:  # noqa: B027 (a hook; no-op by default)
        """Serialise ``get_or_create_pending`` callers with the same scope (no-op if the
        write transaction already excludes every other writer)."""

    def _grants_changed(self, cur: Any, delta: GrantDelta) -> None:  # noqa: B027 (a hook)
        """Called inside the transaction that bumped the grants revision, with its changes."""

    def _snapshot(self) -> contextlib.AbstractContextManager[Any]:
        """A read transaction whose statements all see one snapshot of the database."""
        return self._tx(write=False)

    @abc.abstractmethod
    def watch_grant_deltas(self, on_delta: Callable[[GrantDelta], None]) -> Subscription: ...

    def watch_grants(self, on_change: Callable[[int], None]) -> Subscription:
        """Call ``on_change(revision)`` soon after any grant changes, from any process."""
        return self.watch_grant_deltas(lambda delta: on_change(delta.revision))

    @abc.abstractmethod
    def close(self) -> None: ...

    # --- grants ---------------------------------------------------------------------------
    def list_grants(self) -> list[Grant]:
        """Every grant, expired ones included."""
        with self._tx(write=False) as cur:
            rows = cur.execute(f"SELECT {_GRANT_COLS} FROM grants "
                               "ORDER BY principal, role, service").fetchall()
        return [codec.grant_from_row(r, self._dt) for r in rows]

    def load_grants(self, pause: Callable[[], None] | None = None) -> tuple[int, list[Grant]]:
        """(revision, every grant) read from one snapshot, so the grants are exactly those
        at that revision. ``pause`` is called between batches of rows (``time.sleep(0)``
        lets other threads run while a large set loads)."""
        grants: list[Grant] = []
        dt = self._dt
        with self._snapshot() as cur:
            revision = int(cur.execute("SELECT revision FROM grants_revision WHERE id = 1")
                           .fetchone()["revision"])
            for batch in self._grant_row_batches(cur):
                grants.extend(codec.grant_from_row(r, dt) for r in batch)
                if pause is not None:
                    pause()
        return revision, grants

    def _grant_row_batches(self, cur: Any) -> Iterator[Sequence[Mapping[str, Any]]]:
        """Every grant's row (``GRANT_COLUMNS``), ``_LOAD_BATCH`` at a time, read with ``cur``."""
        rows = cur.execute(f"SELECT {_GRANT_COLS} FROM grants")
        while batch := rows.fetchmany(_LOAD_BATCH):
            yield batch

    def grants_revision(self) -> int:
        """A number that increases whenever any grant changes."""
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT revision FROM grants_revision WHERE id = 1").fetchone()["revision"])

    def grant_changes_since(self, revision: int) -> GrantDelta | None:
        """The changes from ``revision`` to the current one, from the change log, or
        ``None`` when the log no longer reaches back that far (reload everything then)."""
        with self._snapshot() as cur:
            current = int(cur.execute("SELECT revision FROM grants_revision WHERE id = 1")
                          .fetchone()["revision"])
            if revision == current:
                return GrantDelta(revision, current, ())
            floor = int(cur.execute("SELECT revision FROM grant_changes_floor WHERE id = 1")
                        .fetchone()["revision"])
            if revision > current or revision < floor:
                return None
            rows = cur.execute(f"SELECT deleted, {_GRANT_COLS} FROM grant_changes "
                               "WHERE revision > %(since)s AND revision <= %(current)s "
                               "ORDER BY seq", {"since": revision, "current": current}).fetchall()
        dt = self._dt
        return GrantDelta(revision, current, tuple(
            GrantChange(codec.grant_from_row(r, dt), deleted=bool(r["deleted"])) for r in rows))

    def put_grant(self, grant: Grant, *, actor: str = "system") -> None:
        """Insert or replace the grant with the same (principal, role, service)."""
        with self._tx(write=True) as cur:
            self._lock_grants(cur)
            row = cur.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE principal = %(principal)s "
                              "AND role = %(role)s AND service = %(service)s",
                              codec.grant_params(grant, self._ts)).fetchone()
            if row is not None and codec.grant_from_row(row, self._dt) == grant:
                return
            self._upsert_grant(cur, grant)
            self._audit_grant(cur, "grant.added", grant, actor)
            self._bump_revision(cur, [GrantChange(grant)])

    def delete_grant(self, principal: str, role: str | Role, service: str | None = None, *,
                     actor: str = "system") -> bool:
        """Remove one grant; True if it existed."""
        role_value = Role(role).value
        with self._tx(write=True) as cur:
            row = cur.execute(f"DELETE FROM grants WHERE principal = %(p)s AND role = %(r)s "
                              f"AND service = %(s)s RETURNING {_GRANT_COLS}",
                              {"p": principal, "r": role_value, "s": service or ""}).fetchone()
            if row is None:
                return False
            removed = codec.grant_from_row(row, self._dt)
            self._audit_grant(cur, "grant.removed", removed, actor)
            self._bump_revision(cur, [GrantChange(removed, deleted=True)])
            return True

    def sync_digest(self, source: str) -> tuple[str, int] | None:
        """(digest, grants revision) recorded by the last ``replace_grants(source, ...,
        digest=...)``, or ``None``."""
        with self._tx(write=False) as cur:
            row = cur.execute("SELECT digest, revision FROM sync_state WHERE source = %(s)s",
                              {"s": source}).fetchone()
        return None if row is None else (str(row["digest"]), int(row["revision"]))

    def replace_grants(self, source: str, grants: Iterable[Grant], *,
                       actor: str = "system", digest: str | None = None) -> GrantDiff:
        """Atomically make the grants whose ``source`` is ``source`` exactly ``grants``.

        Grants held under another source (for example "manual") are never touched: a
        grant in ``grants`` whose (principal, role, service) is already held under
        another source is left to that holder and not reported as added. ``digest``
        (of the input the grants came from) is recorded with the resulting revision, in
        the same transaction, for ``sync_digest``.
        """
        grants = list(grants)
        with self._tx(write=True) as cur:
            self._lock_grants(cur)
            dt = self._dt
            current = [codec.grant_from_row(r, dt)
                       for r in cur.execute(f"SELECT {_GRANT_COLS} FROM grants").fetchall()]
            diff = plan_replace(current, source, grants)
            if not diff.added and not diff.removed:
                self._record_digest(cur, source, digest)
                return diff  # no grant written, revision unchanged
            # One statement per kind, bound in bulk by the driver.
            ts = self._ts
            if diff.removed:
                cur.executemany(_DELETE_GRANT, [codec.grant_params(g, ts) for g in diff.removed])
            if diff.added:
                cur.executemany(_UPSERT_GRANT, [codec.grant_params(g, ts) for g in diff.added])
            at = _now()
            events = [AuditEvent(kind="grant.removed", actor=actor, at=at, service=g.service,
                                 detail=codec.grant_detail(g)) for g in diff.removed]
            events += [AuditEvent(kind="grant.added", actor=actor, at=at, service=g.service,
                                  detail=codec.grant_detail(g)) for g in diff.added]
            cur.executemany(_INSERT_AUDIT, [codec.audit_params(e, ts, self._json_in) for e in events])
            self._bump_revision(cur, [GrantChange(g, deleted=True) for g in diff.removed]
                                + [GrantChange(g) for g in diff.added])
            self._record_digest(cur, source, digest)
        return diff

    def _record_digest(self, cur: Any, source: str, digest: str | None) -> None:
        if digest is None:
            return
        cur.execute("INSERT INTO sync_state (source, digest, revision) SELECT %(s)s, %(d)s, revision "
                    "FROM grants_revision WHERE id = 1 ON CONFLICT (source) DO UPDATE SET "
                    "digest = excluded.digest, revision = excluded.revision",
                    {"s": source, "d": digest})

    def _lock_grants(self, cur: Any) -> None:
        """Serialise grant writers (a second sync waits for the first to commit)."""
        cur.execute(f"SELECT revision FROM grants_revision WHERE id = 1{self._FOR_UPDATE}")

    def _upsert_grant(self, cur: Any, grant: Grant) -> None:
        cur.execute(_UPSERT_GRANT, codec.grant_params(grant, self._ts))

    def _audit_grant(self, cur: Any, kind: str, grant: Grant, actor: str) -> None:
        self._insert_audit(cur, AuditEvent(kind=kind, actor=actor, at=_now(), service=grant.service,
                                           detail=codec.grant_detail(grant)))

    def _bump_revision(self, cur: Any, changes: Sequence[GrantChange]) -> None:
        """Advance the grants revision by one, log ``changes`` under it (pruning the log to
        the last ``CHANGE_LOG_REVISIONS``), and tell the adapter (PostgreSQL NOTIFYs)."""
        rev = int(cur.execute("UPDATE grants_revision SET revision = revision + 1 WHERE id = 1 "
                              "RETURNING revision").fetchone()["revision"])
        ts = self._ts
        cur.executemany(_LOG_CHANGE, [{**codec.grant_params(c.grant, ts), "revision": rev,
                                       "deleted": c.deleted} for c in changes])
        if rev % 100 == 0:  # prune now and then; the floor says how far back the log reaches
            floor = rev - CHANGE_LOG_REVISIONS
            cur.execute("DELETE FROM grant_changes WHERE revision <= %(floor)s", {"floor": floor})
            cur.execute("UPDATE grant_changes_floor SET revision = %(floor)s "
                        "WHERE id = 1 AND revision < %(floor)s", {"floor": floor})
        self._grants_changed(cur, GrantDelta(rev - 1, rev, tuple(changes)))

    # --- approval requests ----------------------------------------------------------------
    def create_request(self, request: ApprovalRequest, *, actor: str) -> ApprovalRequest:
        """Store a new request and its ``request.created`` audit event in one transaction."""
        with self._tx(write=True) as cur:
            self._insert_request(cur, request, actor)
        return request

    def get_or_create_pending(self, request: ApprovalRequest, *,
                              actor: str) -> tuple[ApprovalRequest, bool]:
        """Return the open pending request with the same requester and scope, or create it.

        Scope is requester + service + method + mode + body_sha256; "open" means PENDING
        and not past ``expires_at`` at ``request.created_at``. Concurrent callers with the
        same scope end with one request.
        """
        scope = (request.requester, request.service, request.method, int(request.mode),
                 request.body_sha256 or "")
        params = {"requester": request.requester, "service": request.service,
                  "method": request.method, "mode": int(request.mode),
                  "body": request.body_sha256, "now": self._ts(request.created_at),
                  "pending": RequestState.PENDING.value}
        body_clause = "body_sha256 IS NULL" if request.body_sha256 is None else "body_sha256 = %(body)s"
        with self._tx(write=True) as cur:
            self._lock_scope(cur, "\x1f".join(map(str, scope)))
            row = cur.execute(
                f"SELECT {_REQ_COLS} FROM requests WHERE requester = %(requester)s "
                "AND service = %(service)s AND method = %(method)s AND mode = %(mode)s "
                f"AND {body_clause} AND state = %(pending)s AND expires_at > %(now)s "
                "ORDER BY created_at, seq LIMIT 1", params).fetchone()
            if row is not None:
                return self._request(row), False
            self._insert_request(cur, request, actor)
            return request, True

    def _insert_request(self, cur: Any, request: ApprovalRequest, actor: str) -> None:
        if cur.execute("SELECT 1 FROM requests WHERE id = %(id)s", {"id": request.id}).fetchone():
            raise ValueError(f"an approval request with id {request.id!r} already exists")
        cur.execute(f"INSERT INTO requests ({_REQ_COLS}) VALUES ({_REQ_VALUES})",
                    codec.request_params(request, self._ts, self._json_in))
        self._insert_audit(cur, AuditEvent(
            kind="request.created", actor=actor, at=request.created_at, request_id=request.id,
            service=request.service, method=request.method, outcome=request.state.value,
            reason=request.reason,
            detail={"mode": request.mode.name, "requester": request.requester,
                    "origin": request.origin, "incident": request.incident,
                    "body_bound": request.body_sha256 is not None,
                    "required_approvals": request.required_approvals,
                    "max_uses": request.max_uses}))

    def put_body_view(self, request_id: str, view: str) -> None:
        """Keep the approver's view of a body-bound request's call (first one wins)."""
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM request_bodies WHERE request_id = %(id)s",
                           {"id": request_id}).fetchone() is None:
                cur.execute("INSERT INTO request_bodies (request_id, view) VALUES (%(id)s, %(v)s)",
                            {"id": request_id, "v": view})

    def get_body_view(self, request_id: str) -> str | None:
        """The view ``put_body_view`` kept, or None."""
        with self._tx(write=False) as cur:
            row = cur.execute("SELECT view FROM request_bodies WHERE request_id = %(id)s",
                              {"id": request_id}).fetchone()
        return None if row is None else str(row["view"])

    def get_request(self, request_id: str) -> ApprovalRequest:
        """The request with this id; raises ``UnknownRequest`` if there is none."""
        with self._tx(write=False) as cur:
            row = cur.execute(f"SELECT {_REQ_COLS} FROM requests WHERE id = %(id)s",
                              {"id": request_id}).fetchone()
        if row is None:
            raise UnknownRequest(f"no approval request has id {request_id!r}")
        return self._request(row)

    def find_requests(self, *, requester: str | None = None, service: str | None = None,
                      method: str | None = None, states: Sequence[RequestState] | None = None,
                      limit: int = 100) -> list[ApprovalRequest]:
        """Requests matching every given filter, newest first."""
        where: list[str] = []
        params: dict[str, object] = {"limit": _limit(limit)}
        for col, value in (("requester", requester), ("service", service), ("method", method)):
            if value is not None:
                where.append(f"{col} = %({col})s")
                params[col] = value
        if states is not None:
            wanted = [RequestState(s) for s in states]
            if not wanted:
                return []
            if frozenset(wanted) == _OPEN_STATES:
                where.append(OPEN_STATES_SQL)  # the gateway's lookup: requests_open_scope
            else:
                for i, state in enumerate(wanted):
                    params[f"s{i}"] = state.value
                where.append(f"state IN ({', '.join(f'%(s{i})s' for i in range(len(wanted)))})")
        sql = f"SELECT {_REQ_COLS} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
        with self._tx(write=False) as cur:
            rows = cur.execute(sql, params).fetchall()
        return [self._request(r) for r in rows]

    def due_requests(self, now: datetime, *, limit: int = 1000) -> list[ApprovalRequest]:
        """Requests the expiry sweep must close at ``now``: pending ones past ``expires_at``
        and approved ones past ``valid_until``, oldest deadline first, at most ``limit`` of each.

        Both halves read a partial index holding only open rows, so the cost follows the
        number of due requests, not the size of the table. The state literals are in the
        SQL on purpose: SQLite uses a partial index only when the query names its condition.
        """
        params = {"now": self._ts(now), "limit": _limit(limit)}
        with self._tx(write=False) as cur:
            pending = cur.execute(
                f"SELECT {_REQ_COLS} FROM requests WHERE state = 'pending' "
                "AND expires_at <= %(now)s ORDER BY expires_at LIMIT %(limit)s", params).fetchall()
            approved = cur.execute(
                f"SELECT {_REQ_COLS} FROM requests WHERE state = 'approved' "
                "AND valid_until <= %(now)s ORDER BY valid_until LIMIT %(limit)s", params).fetchall()
        return [self._request(r) for r in (*pending, *approved)]

    def update_request(self, request_id: str, change: Transition, *, actor: str,
                       kind: str, reason: str = "") -> ApprovalRequest:
        """Atomically read, apply ``change``, write, and append an audit event of ``kind``.

        If ``change`` raises, nothing is written and the error propagates. If it returns
        the request unchanged (``expire`` on a live request), nothing is written and no
        audit event is recorded. A transition may not change the request's identity
        (id, requester, service, method, mode, required approvals); it may narrow its limits
        (body digest, uses, approval duration) only while pending with no approvals.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown audit event kind {kind!r}")
        with self._tx(write=True) as cur:
            return self._update_locked(cur, request_id, change, actor=actor, kind=kind, reason=reason)

    def _update_locked(self, cur: Any, request_id: str, change: Transition, *, actor: str, kind: str,
                       reason: str, detail: dict[str, Any] | None = None) -> ApprovalRequest:
        """``update_request``'s body inside the caller's write transaction (row locked)."""
        row = cur.execute(f"SELECT {_REQ_COLS} FROM requests WHERE id = %(id)s{self._FOR_UPDATE}",
                          {"id": request_id}).fetchone()
        if row is None:
            raise UnknownRequest(f"no approval request has id {request_id!r}")
        old = self._request(row)
        new = change(old)
        if not isinstance(new, ApprovalRequest):
            raise TypeError(f"transition returned {type(new).__name__}, not an ApprovalRequest")
        changed = [f for f in _IMMUTABLE if getattr(new, f) != getattr(old, f)]
        changed += _only_narrowed(old, new)
        if changed:
            raise ValueError(f"a transition may not change {', '.join(changed)} of request {request_id}")
        if new == old:
            return old
        params = codec.request_params(new, self._ts, self._json_in)
        sets = ", ".join(f"{c} = %({c})s" for c in _MUTABLE)
        cur.execute(f"UPDATE requests SET {sets} WHERE id = %(id)s", params)
        self._insert_audit(cur, AuditEvent(
            kind=kind, actor=actor, at=_now(), request_id=new.id, service=new.service,
            method=new.method, outcome=new.state.value, reason=reason,
            detail={"from_state": old.state.value, "to_state": new.state.value,
                    "approvals": list(new.approvers), "uses": new.uses,
                    "required_approvals": new.required_approvals,
                    "max_uses": new.max_uses, **(detail or {})}))
        return new

    # --- spends of approval uses by the gateway (one per decision) ------------------------
    def spend_use(self, request_id: str, change: Transition, *, decision_id: str, actor: str,
                  reason: str = "") -> ApprovalRequest:
        """Spend one use of ``request_id`` for the check ``decision_id``: ``change`` (``policy.use``)
        applied under the row lock, a ``spends`` row naming the decision and a ``request.used``
        audit event, in one transaction.

        Raises ``SpendVoided`` (nothing written) if ``void_spend(decision_id)`` came first: the
        check was already answered without an allow. ``change`` must add exactly one use.
        """
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM spends WHERE decision_id = %(d)s",
                           {"d": decision_id}).fetchone() is not None:
                raise SpendVoided(f"decision {decision_id} was voided before its spend of approval "
                                  f"{request_id} reached the store; nothing spent")
            uses: list[int] = []

            def counted(r: ApprovalRequest) -> ApprovalRequest:
                new = change(r)
                uses.append(r.uses)
                return new
            new = self._update_locked(cur, request_id, counted, actor=actor, kind="request.used",
                                      reason=reason, detail={"decision_id": decision_id})
            if new.uses != uses[0] + 1:
                raise ValueError(f"a spend must add exactly one use to request {request_id}")
            cur.execute("INSERT INTO spends (decision_id, request_id, state, at) "
                        "VALUES (%(d)s, %(r)s, 'spent', %(at)s)",
                        {"d": decision_id, "r": request_id, "at": self._ts(_now())})
        return new

    def void_spend(self, decision_id: str, *, actor: str, reason: str = "") -> ApprovalRequest | None:
        """The check ``decision_id`` was not answered allow: give back the use it spent, if its
        spend committed (``request.use_voided`` audit event; returns the request), and make sure
        a spend still in flight for it never commits (returns None). Idempotent.

        Safe against a spend whose commit is in flight: the tombstone's insert waits for that
        transaction (same key), and the request row lock orders the give-back after it.
        """
        with self._tx(write=True) as cur:
            params = {"d": decision_id, "at": self._ts(_now())}
            if cur.execute("INSERT INTO spends (decision_id, request_id, state, at) "
                           "VALUES (%(d)s, '', 'voided', %(at)s) ON CONFLICT (decision_id) DO NOTHING "
                           "RETURNING decision_id", params).fetchone() is not None:
                return None  # nothing was spent, and now nothing can be
            row = cur.execute(f"SELECT request_id, state FROM spends WHERE decision_id = %(d)s"
                              f"{self._FOR_UPDATE}", params).fetchone()
            if row is None or row["state"] != "spent":
                return None  # voided before
            new = self._update_locked(cur, str(row["request_id"]), give_back, actor=actor,
                                      kind="request.use_voided", reason=reason,
                                      detail={"decision_id": decision_id})
            cur.execute("UPDATE spends SET state = 'voided', at = %(at)s WHERE decision_id = %(d)s", params)
        return new

    def _request(self, row: Any) -> ApprovalRequest:
        return codec.request_from_row(row, self._dt, self._json_out)

    # --- audit ----------------------------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None:
        """Write one audit event durably."""
        with self._tx(write=True) as cur:
            self._insert_audit(cur, event)

    def append_audits(self, events: Sequence[AuditEvent]) -> None:
        """Write several audit events durably in one transaction (one commit for a batch).

        One ``executemany`` of the same INSERT: the statement is prepared once and the
        rows are bound in the driver (sqlite3's C loop; psycopg pipelines them), instead of
        a Python-level ``execute`` per event.
        """
        if not events:
            return
        ts, json_in = self._ts, self._json_in
        rows = [codec.audit_params(e, ts, json_in) for e in events]
        with self._tx(write=True) as cur:
            cur.executemany(_INSERT_AUDIT, rows)

    def append_audit_json(self, events: Sequence[str]) -> None:
        """Write several audit events given as JSON objects (``AuditEvent.to_json()``'s keys,
        ``at`` an RFC 3339 time in UTC with microseconds, e.g. the audit spool's rows) in one
        transaction; the database decodes them (no Python object per event). An id the store
        holds is skipped, as in ``append_audits``."""
        if not events:
            return
        with self._tx(write=True) as cur:
            cur.execute(self._INSERT_AUDIT_JSON, {"events": "[" + ",".join(events) + "]"})

    #: ``append_audit_json``'s statement (the dialect's JSON functions), ``%(events)s`` a JSON
    #: array of the events: one statement for them all.
    _INSERT_AUDIT_JSON: str

    def _insert_audit(self, cur: Any, event: AuditEvent) -> None:
        cur.execute(_INSERT_AUDIT, codec.audit_params(event, self._ts, self._json_in))

    def list_audit(self, *, since: datetime | None = None, kinds: Sequence[str] | None = None,
                   service: str | None = None, request_id: str | None = None,
                   limit: int = 1000) -> list[AuditEvent]:
        """Audit events matching every filter, oldest first (``since`` is inclusive)."""
        where: list[str] = []
        params: dict[str, object] = {"limit": _limit(limit)}
        if since is not None:
            where.append("at >= %(since)s")
            params["since"] = self._ts(since)
        if service is not None:
            where.append("service = %(service)s")
            params["service"] = service
        if request_id is not None:
            where.append("request_id = %(request_id)s")
            params["request_id"] = request_id
        if kinds is not None:
            if not kinds:
                return []
            names = []
            for i, k in enumerate(kinds):
                params[f"k{i}"] = k
                names.append(f"%(k{i})s")
            where.append(f"kind IN ({', '.join(names)})")
        sql = f"SELECT {_AUDIT_COLS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at, seq LIMIT %(limit)s"
        with self._tx(write=False) as cur:
            rows = cur.execute(sql, params).fetchall()
        return [codec.audit_from_row(r, self._dt, self._json_out) for r in rows]

    # --- context manager sugar ------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def plan_replace(current: Iterable[Grant], source: str, grants: Iterable[Grant]) -> GrantDiff:
    """What ``replace_grants(source, grants)`` would change, given the ``current`` grants.

    Pure; the stores call it inside their write transaction, and ``mpactl sync --dry-run``
    calls it on a snapshot. Raises ``ValueError`` for a grant from another source or two
    different grants for one (principal, role, service).
    """
    desired: dict[tuple[str, str, str], Grant] = {}
    for g in grants:
        if g.source != source:
            raise ValueError(f"replace_grants({source!r}) was given a grant from source "
                             f"{g.source!r}: {g.principal} {g.role.value} {g.service or ''}")
        held = desired.get(g.key)
        if held is not None and held != g:
            raise ValueError(f"replace_grants({source!r}) was given two different grants "
                             f"for {g.principal} {g.role.value} {g.service or ''}")
        desired[g.key] = g
    current = list(current)
    mine = {g.key: g for g in current if g.source == source}
    for g in current:
        if g.source != source:  # held by someone else (e.g. "manual"): leave it alone
            desired.pop(g.key, None)
    removed = sorted((g for k, g in mine.items() if k not in desired), key=_grant_order)
    added = sorted((g for k, g in desired.items() if mine.get(k) != g), key=_grant_order)
    return GrantDiff(added=tuple(added), removed=tuple(removed))


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    return limit


def _grant_order(g: Grant) -> tuple[str, str, str]:
    return g.key


def _now() -> datetime:
    return datetime.now(UTC)

