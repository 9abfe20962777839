"""Every query the approvals server and the gateway run per page view or on a timer uses an
index on ``requests``: the real code runs against a store holding many (mostly closed)
requests, every statement it sends is recorded, and the database's own planner
(SQLite ``EXPLAIN QUERY PLAN``, PostgreSQL ``EXPLAIN (FORMAT JSON)`` after ``ANALYZE``)
must not answer any of them with a full scan of ``requests``.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from mpa.config import RequestPolicy
from mpa.service import ApprovalService
from policy import Grant, GrantSet, Mode, RequestState, Role, Target, open_request

NOW = datetime.now(UTC)
#: Rows loaded before planning: enough that a scan and an index lookup cost very differently.
ROWS = 20_000
SVC = "svc1.v1.Svc"
#: Indexes holding only open (pending / approved) requests.
_PARTIAL = {"requests_pending_expiry", "requests_approved_expiry", "requests_open_scope"}

_COLUMNS = ("id, requester, service, method, mode, created_at, expires_at, approval_ttl_us, "
            "reason, incident, body_sha256, required_approvals, max_uses, uses, state, approvals, "
            "valid_until, closed_by, closed_at, close_reason, origin")


def _load_history(store: Any, backend: str) -> None:
    """ROWS requests of 500 other people over 300 services, 1% pending, the rest closed."""
    if backend == "sqlite":
        sql = (f"INSERT INTO requests ({_COLUMNS}) WITH RECURSIVE n(i) AS "
               f"(SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS}) "
               "SELECT 'bulk' || i, 'other' || (i % 500) || '@example.com', "
               "'svc' || (i % 300) || '.v1.Svc', 'Do', 2, "
               "strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', '2026-01-01', '+' || i || ' minutes'), "
               "strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', '2026-01-01', '+' || (i + 60) || ' minutes'), "
               "3600000000, 'bulk', NULL, NULL, 1, NULL, 0, "
               "CASE WHEN i % 100 = 0 THEN 'pending' ELSE 'expired' END, '[]', NULL, NULL, NULL, "
               "'', 'user' FROM n")
    else:
        sql = (f"INSERT INTO requests ({_COLUMNS}) SELECT 'bulk' || i, "
               "'other' || (i % 500) || '@example.com', 'svc' || (i % 300) || '.v1.Svc', 'Do', 2, "
               "timestamptz '2026-01-01Z' + i * interval '1 minute', "
               "timestamptz '2026-01-01Z' + (i + 60) * interval '1 minute', "
               "3600000000, 'bulk', NULL, NULL, 1, NULL, 0, "
               "CASE WHEN i % 100 = 0 THEN 'pending' ELSE 'expired' END, '[]'::jsonb, NULL, NULL, "
               f"NULL, '', 'user' FROM generate_series(1, {ROWS}) AS i")
    with store._tx(write=True) as cur:
        cur.execute(sql)
    with store._tx(write=False) as cur:
        cur.execute("ANALYZE")


@contextlib.contextmanager
def _recording(store: Any) -> Iterator[list[tuple[str, Any]]]:
    """Record every (sql, params) the store executes while the block runs."""
    seen: list[tuple[str, Any]] = []
    real_tx = store._tx

    class Recorder:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def execute(self, sql: str, params: Any = ()) -> Any:
            seen.append((sql, params))
            return self._cur.execute(sql, params)

        def executemany(self, sql: str, rows: Any) -> Any:
            return self._cur.executemany(sql, rows)

    @contextlib.contextmanager
    def tx(*, write: bool) -> Iterator[Recorder]:
        with real_tx(write=write) as cur:
            yield Recorder(cur)

    store._tx = tx
    try:
        yield seen
    finally:
        del store._tx


def _full_scans(store: Any, backend: str, sql: str, params: Any) -> list[str]:
    """The planner's full scans of ``requests`` for one statement (empty when indexed).

    An index walk with no condition is accepted only for the unfiltered newest-first
    listing (it stops after LIMIT rows) and on the partial indexes, which hold only the
    open requests.
    """
    unfiltered = " WHERE " not in sql
    with store._tx(write=False) as cur:
        if backend == "sqlite":
            plan = [r["detail"] for r in cur.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
            return [d for d in plan if re.match(r"SCAN requests\b", d)
                    and not (unfiltered and "USING INDEX requests_created_seq" in d)]
        doc = cur.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()
    plan = doc["QUERY PLAN"]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    bad: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "requests":
            kind = node["Node Type"]
            whole_index = (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node
                           and not unfiltered and node.get("Index Name") not in _PARTIAL)
            if kind == "Seq Scan" or whole_index:
                bad.append(f"{kind} {node.get('Index Name', '')} filter={node.get('Filter')}")
        for child in node.get("Plans", ()):
            walk(child)
    walk(plan[0]["Plan"])
    return bad


def test_per_page_and_timer_queries_use_indexes(backend, store):
    _load_history(store, backend.name)
    grants = GrantSet([Grant("me@example.com", Role.ENGINEER), Grant("you@example.com", Role.ENGINEER)])
    for who in ("me@example.com", "you@example.com"):
        store.put_grant(Grant(who, Role.ENGINEER))
    mine = store.create_request(open_request(
        request_id="mine1", requester="me@example.com", target=Target(SVC, "Do"),
        mode=Mode.ENGINEERS_WITH_APPROVAL, grants=grants, now=NOW, reason="looking into it"),
        actor="me@example.com")
    service = ApprovalService(store, RequestPolicy(), clock=lambda: NOW + timedelta(seconds=1),
                              auditors=("you@example.com",))  # scope=all is for auditors

    with _recording(store) as seen:
        # the approvals page and API
        service.list("me@example.com", scope="mine")
        service.list("me@example.com", scope="mine", states=[RequestState.PENDING])
        service.list("you@example.com", scope="reviewable")
        service.list("you@example.com", scope="all", limit=50)
        service.list("you@example.com", scope="all", states=[RequestState.APPROVED], limit=50)
        service.get(mine.id)
        service.permissions(mine, "you@example.com")
        service.open_gateway_request("me@example.com", Target(SVC, "Do"), None)
        store.list_audit(request_id=mine.id)
        # the timer
        service.sweep_expired()
        # the gateway, per call in an approval mode
        store.find_requests(requester="me@example.com", service=SVC, method="Do",
                            states=[RequestState.PENDING, RequestState.APPROVED])
        store.get_or_create_pending(mine, actor="me@example.com")
        service.approve(mine.id, "you@example.com", "fine")

    statements = [(sql, p) for sql, p in seen
                  if re.search(r"\b(FROM|UPDATE)\s+requests\b", sql) and not sql.startswith("INSERT")]
    assert len(statements) >= 12, [s for s, _ in statements]
    found = {sql: _full_scans(store, backend.name, sql, params) for sql, params in statements}
    scans = {sql: bad for sql, bad in found.items() if bad}
    assert not scans, f"full scans of requests on {backend.name}: {json.dumps(scans, indent=1)}"


def test_the_checker_sees_a_full_scan(backend, store):
    """The test above can fail: a filter on an unindexed column is reported."""
    _load_history(store, backend.name)
    assert _full_scans(store, backend.name,
                       "SELECT id FROM requests WHERE reason = %(r)s", {"r": "x"})


def test_the_gateways_lookup_reads_only_open_requests(backend, store):
    """The per-check lookup walks requests_open_scope, the partial index of open requests, so
    its cost follows the few open requests, not the history (issue 13: flat at 1M requests).
    The open row it must find is found; a closed one of the same caller and method is not."""
    _load_history(store, backend.name)
    with store._tx(write=True) as cur:
        cur.execute("UPDATE requests SET state = 'approved' WHERE id = 'bulk1'")
    with _recording(store) as seen:
        found = store.find_requests(requester="other1@example.com", service="svc1.v1.Svc", method="Do",
                                    states=[RequestState.APPROVED, RequestState.PENDING])
    assert [r.id for r in found] == ["bulk1"]  # bulk501, 1001, ... are the same caller's, closed
    (sql, params), = seen
    with store._tx(write=False) as cur:
        if backend.name == "sqlite":
            plan = " ".join(r["detail"] for r in cur.execute("EXPLAIN QUERY PLAN " + sql, params))
        else:
            plan = json.dumps(cur.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone())
    assert "requests_open_scope" in plan, plan


def test_other_state_filters_keep_their_parameters(store):
    """Only the open pair takes the partial index's literal condition; other sets still filter."""
    with _recording(store) as seen:
        assert store.find_requests(states=[RequestState.EXPIRED, RequestState.PENDING]) == []
        assert store.find_requests(states=[]) == []
    (sql, params), = seen
    assert "'pending'" not in sql and sorted(v for k, v in params.items() if k.startswith("s")) == [
        "expired", "pending"]
