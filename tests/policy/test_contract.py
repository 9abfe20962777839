"""The Store contract, run against both adapters (SQLite file, real PostgreSQL).

Every Store method, the request lifecycle through update_request with the real policy
transitions, atomicity of refused transitions, restart durability, and refusals.
"""
from __future__ import annotations

import dataclasses
import threading
import uuid
from datetime import datetime, timedelta

import pytest

from policy import (
    AlreadyDecided,
    ApprovalRequest,
    Grant,
    Mode,
    NotEligible,
    PolicyError,
    RequestClosed,
    RequestExpired,
    RequestState,
    Role,
    SelfApproval,
    SpendVoided,
    StoreError,
    Target,
    UnknownRequest,
    approve,
    cancel,
    complete,
    expire,
    open_request,
    reject,
    use,
)
from policy.audit import AuditEvent
from policy.store import GrantDiff
from tests.support.store_data import GRANTS, NOW, SVC, TARGET, new_request


def kinds_for(store, request_id: str) -> list[str]:
    return [e.kind for e in store.list_audit(request_id=request_id)]


# --- grants ---------------------------------------------------------------------------------

def test_put_list_and_revision(store):
    assert store.list_grants() == []
    rev0 = store.grants_revision()
    exp = NOW + timedelta(days=3)
    g1 = Grant("alice", Role.ENGINEER)
    g2 = Grant("alice", Role.CONTRIBUTOR, SVC, expires_at=exp)
    g3 = Grant("zed", Role.SECURITY_ONCALL, expires_at=NOW - timedelta(days=1))  # expired: still listed
    for g in (g1, g2, g3):
        store.put_grant(g)
    assert set(store.list_grants()) == {g1, g2, g3}
    assert [g for g in store.list_grants() if g.service == SVC][0].expires_at == exp
    rev1 = store.grants_revision()
    assert rev1 >= rev0 + 3

    store.put_grant(g1)  # identical: no change, no revision bump
    assert store.grants_revision() == rev1

    g2b = dataclasses.replace(g2, expires_at=None)  # same key replaces
    store.put_grant(g2b)
    assert store.grants_revision() > rev1
    assert g2b in store.list_grants() and g2 not in store.list_grants()
    assert len(store.list_grants()) == 3


def test_delete_grant(store):
    store.put_grant(Grant("alice", Role.CONTRIBUTOR, SVC))
    store.put_grant(Grant("alice", Role.ENGINEER))
    rev = store.grants_revision()
    assert store.delete_grant("alice", "contributor", SVC) is True
    assert store.grants_revision() > rev
    rev = store.grants_revision()
    assert store.delete_grant("alice", Role.CONTRIBUTOR, SVC) is False
    assert store.delete_grant("alice", "contributor", "other.v1.Svc") is False
    assert store.grants_revision() == rev
    assert store.list_grants() == [Grant("alice", Role.ENGINEER)]
    with pytest.raises(ValueError):
        store.delete_grant("alice", "wizard")


def test_grant_changes_are_audited(store):
    g = Grant("alice", Role.CONTRIBUTOR, SVC)
    store.put_grant(g, actor="ops:jo")
    store.delete_grant("alice", "contributor", SVC, actor="ops:jo")
    events = store.list_audit(kinds=["grant.added", "grant.removed"])
    assert [(e.kind, e.actor, e.service) for e in events] == [
        ("grant.added", "ops:jo", SVC), ("grant.removed", "ops:jo", SVC)]
    assert events[0].detail["principal"] == "alice" and events[0].detail["role"] == "contributor"


def test_replace_grants_adds_and_removes_exactly_its_own_source(store):
    manual = Grant("alice", Role.CONTRIBUTOR, SVC)
    store.put_grant(manual)
    src = "sync:catalog"
    a = Grant("bob", Role.CONTRIBUTOR, SVC, source=src)
    b = Grant("carol", Role.CONTRIBUTOR, SVC, source=src)
    clash = Grant("alice", Role.CONTRIBUTOR, SVC, source=src)  # manual holds this key
    diff = store.replace_grants(src, [a, b, clash, a])  # duplicates collapse
    assert set(diff.added) == {a, b} and diff.removed == ()
    assert set(store.list_grants()) == {manual, a, b}

    rev = store.grants_revision()
    assert store.replace_grants(src, [b, a]) == GrantDiff()  # nothing to do
    assert store.grants_revision() == rev

    c = Grant("dave", Role.ENGINEER, source=src)
    b2 = dataclasses.replace(b, expires_at=NOW + timedelta(days=1))
    diff = store.replace_grants(src, [b2, c])
    assert set(diff.added) == {b2, c} and diff.removed == (a,)
    assert set(store.list_grants()) == {manual, b2, c}
    assert store.grants_revision() > rev

    other = Grant("erin", Role.SECURITY_ONCALL, source="sync:oncall")
    store.replace_grants("sync:oncall", [other])
    diff = store.replace_grants(src, [])
    assert set(diff.removed) == {b2, c}
    assert set(store.list_grants()) == {manual, other}  # manual and other sources untouched


def test_replace_grants_refuses_bad_input_and_writes_nothing(store):
    rev = store.grants_revision()
    with pytest.raises(ValueError, match="source 'manual'"):
        store.replace_grants("sync:catalog", [Grant("bob", Role.ENGINEER)])
    with pytest.raises(ValueError, match="two different grants"):
        store.replace_grants("sync:catalog", [
            Grant("bob", Role.ENGINEER, source="sync:catalog"),
            Grant("bob", Role.ENGINEER, expires_at=NOW, source="sync:catalog")])
    assert store.list_grants() == [] and store.grants_revision() == rev


def test_watch_grants_sees_changes_from_another_connection(backend):
    watcher_store = backend.open(poll_interval=0.1)
    writer = backend.open()
    seen: list[int] = []
    changed = threading.Event()

    def on_change(rev: int) -> None:
        seen.append(rev)
        changed.set()

    sub = watcher_store.watch_grants(on_change)
    try:
        if hasattr(sub, "wait_connected"):
            assert sub.wait_connected(10)
        writer.put_grant(Grant("alice", Role.ENGINEER))
        assert changed.wait(10), "no change notification within 10 s"
        assert seen[-1] == writer.grants_revision()
        changed.clear()
        writer.delete_grant("alice", "engineer")
        assert changed.wait(10)
        assert max(seen) == writer.grants_revision()
    finally:
        sub.close()
    # a refused change writes nothing and announces nothing
    changed.clear()
    with pytest.raises(ValueError):
        writer.replace_grants("sync:x", [Grant("x", Role.ENGINEER, source="sync:x"),
                                         Grant("x", Role.ENGINEER, source="sync:y")])
    assert not changed.wait(0.6)
    # a closed subscription reports nothing more
    count = len(seen)
    writer.put_grant(Grant("bob", Role.ENGINEER))
    changed.clear()
    assert not changed.wait(0.6)
    assert len(seen) == count


# --- requests -------------------------------------------------------------------------------

def test_create_get_and_created_audit(store):
    r = new_request(body_sha256="ab" * 32, max_uses=3, required_approvals=2,
                    approval_ttl=timedelta(minutes=20))
    assert store.create_request(r, actor="alice") == r
    assert store.get_request(r.id) == r  # every field, times to the microsecond
    [event] = store.list_audit(request_id=r.id)
    assert (event.kind, event.actor, event.service, event.method) == (
        "request.created", "alice", SVC, "Refund")
    with pytest.raises(ValueError, match="already exists"):
        store.create_request(r, actor="alice")
    with pytest.raises(UnknownRequest, match="nope"):
        store.get_request("nope")


def test_get_or_create_pending_reuses_only_the_same_open_scope(store):
    first, created = store.get_or_create_pending(new_request(), actor="gateway")
    assert created
    again, created = store.get_or_create_pending(new_request(now=NOW + timedelta(minutes=1)),
                                                 actor="gateway")
    assert not created and again.id == first.id
    assert kinds_for(store, first.id) == ["request.created"]

    # different scope parts each get their own request
    variants = [
        new_request("bob"),
        new_request(target=Target(SVC, "Charge")),
        new_request(mode=Mode.ENGINEERS_WITH_APPROVAL),
        new_request(body_sha256="cd" * 32),
    ]
    for v in variants:
        got, created = store.get_or_create_pending(v, actor="gateway")
        assert created and got.id == v.id
    # the body-bound one is reused for that body only
    got, created = store.get_or_create_pending(new_request(body_sha256="cd" * 32), actor="gateway")
    assert not created and got.id == variants[-1].id

    # once the pending one has expired (at the caller's clock), a new one is made
    late = new_request(now=first.expires_at + timedelta(seconds=1))
    got, created = store.get_or_create_pending(late, actor="gateway")
    assert created and got.id == late.id

    # a closed request is not reused
    store.update_request(late.id, lambda r: cancel(r, "alice", NOW), actor="alice",
                         kind="request.cancelled")
    later = new_request(now=first.expires_at + timedelta(seconds=2))
    assert store.get_or_create_pending(later, actor="gateway")[1] is True


def test_find_requests_filters_newest_first(store):
    rs = [new_request("alice", now=NOW + timedelta(seconds=i)) for i in range(3)]
    rs.append(new_request("bob", now=NOW + timedelta(seconds=5)))
    rs.append(new_request("alice", target=Target("other.v1.Svc", "Get"),
                          mode=Mode.ENGINEERS_WITH_APPROVAL, now=NOW + timedelta(seconds=6)))
    for r in rs:
        store.create_request(r, actor=r.requester)
    store.update_request(rs[1].id, lambda r: approve(r, "bob", GRANTS, NOW + timedelta(seconds=9)),
                         actor="bob", kind="request.approved")

    assert [r.id for r in store.find_requests()] == [r.id for r in reversed(rs)]
    assert [r.id for r in store.find_requests(requester="alice", service=SVC)] == [
        rs[2].id, rs[1].id, rs[0].id]
    assert [r.id for r in store.find_requests(method="Get")] == [rs[4].id]
    assert [r.id for r in store.find_requests(states=[RequestState.APPROVED])] == [rs[1].id]
    assert len(store.find_requests(states=[RequestState.PENDING, RequestState.APPROVED])) == 5
    assert store.find_requests(states=[]) == []
    assert [r.id for r in store.find_requests(limit=2)] == [rs[4].id, rs[3].id]
    assert store.find_requests(requester="nobody") == []
    assert store.find_requests(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        store.find_requests(limit=-1)
    with pytest.raises(ValueError, match="limit"):
        store.list_audit(limit="10")


def test_full_lifecycle_approve_and_use(store):
    r = store.create_request(new_request(required_approvals=2, max_uses=2), actor="alice")
    t = NOW + timedelta(minutes=1)

    with pytest.raises(SelfApproval):
        store.update_request(r.id, lambda x: approve(x, "alice", GRANTS, t), actor="alice",
                             kind="request.approved")
    with pytest.raises(NotEligible):  # dave is not a contributor of the service
        store.update_request(r.id, lambda x: approve(x, "dave", GRANTS, t), actor="dave",
                             kind="request.approved")
    one = store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, t, "ok"), actor="bob",
                               kind="request.approval_recorded")
    assert one.state is RequestState.PENDING and one.approvers == ("bob",)
    with pytest.raises(AlreadyDecided):
        store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, t), actor="bob",
                             kind="request.approval_recorded")
    two = store.update_request(r.id, lambda x: approve(x, "carol", GRANTS, t), actor="carol",
                               kind="request.approved")
    assert two.state is RequestState.APPROVED and two.valid_until == t + r.approval_ttl
    assert store.get_request(r.id) == two
    assert store.get_request(r.id).approvals[0].comment == "ok"

    for n in (1, 2):
        assert store.update_request(r.id, lambda x: use(x, t), actor="alice",
                                    kind="request.used").uses == n
    with pytest.raises(RequestClosed, match="used 2 of 2"):
        store.update_request(r.id, lambda x: use(x, t), actor="alice", kind="request.used")
    assert store.get_request(r.id).uses == 2

    # past valid_until, expire() closes it
    done = store.update_request(r.id, lambda x: expire(x, two.valid_until), actor="system",
                                kind="request.expired")
    assert done.state is RequestState.EXPIRED
    assert kinds_for(store, r.id) == ["request.created", "request.approval_recorded",
                                      "request.approved", "request.used", "request.used",
                                      "request.expired"]
    used = store.list_audit(request_id=r.id, kinds=["request.used"])
    assert [e.detail["uses"] for e in used] == [1, 2] and used[0].actor == "alice"


def _approved(store, max_uses=None):
    t = NOW + timedelta(minutes=1)
    r = store.create_request(new_request(max_uses=max_uses), actor="alice")
    r = store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, t), actor="bob",
                             kind="request.approved")
    assert r.state is RequestState.APPROVED
    return r, t


def test_spend_then_void_gives_the_use_back_once(store):
    r, t = _approved(store, max_uses=1)
    spent = store.spend_use(r.id, lambda x: use(x, t), decision_id="d1", actor="alice", reason="call")
    assert spent.uses == 1 and store.get_request(r.id).uses == 1
    with pytest.raises(RequestClosed, match="used 1 of 1"):  # the last use is gone...
        store.spend_use(r.id, lambda x: use(x, t), decision_id="d2", actor="alice")
    given = store.void_spend("d1", actor="gw", reason="503")
    assert given is not None and given.uses == 0 and store.get_request(r.id).uses == 0
    assert store.void_spend("d1", actor="gw") is None  # idempotent: nothing more given back
    assert store.get_request(r.id).uses == 0
    # ...and back for another call; "d2" was refused (rolled back), so it can still spend.
    assert store.spend_use(r.id, lambda x: use(x, t), decision_id="d2", actor="alice").uses == 1
    events = store.list_audit(request_id=r.id, kinds=["request.used", "request.use_voided"])
    assert [(e.kind, e.detail["decision_id"], e.detail["uses"]) for e in events] == [
        ("request.used", "d1", 1), ("request.use_voided", "d1", 0), ("request.used", "d2", 1)]


def test_void_before_spend_refuses_the_spend(store):
    """A void that reaches the store first leaves a tombstone: the late spend commits nothing."""
    r, t = _approved(store)
    assert store.void_spend("d9", actor="gw") is None
    with pytest.raises(SpendVoided, match="d9"):
        store.spend_use(r.id, lambda x: use(x, t), decision_id="d9", actor="alice")
    assert store.get_request(r.id).uses == 0
    assert kinds_for(store, r.id)[-1] == "request.approved"


def test_spend_must_add_exactly_one_use(store):
    r, t = _approved(store)
    with pytest.raises(ValueError, match="exactly one use"):
        store.spend_use(r.id, lambda x: dataclasses.replace(use(use(x, t), t)), decision_id="d3",
                        actor="alice")
    assert store.get_request(r.id).uses == 0
    assert store.void_spend("d3", actor="gw") is None  # nothing was recorded for d3


def test_reject_cancel_complete_and_expire(store):
    t = NOW + timedelta(minutes=1)
    r1 = store.create_request(new_request(), actor="alice")
    rejected = store.update_request(r1.id, lambda x: reject(x, "bob", GRANTS, t, "no ticket"),
                                    actor="bob", kind="request.rejected", reason="no ticket")
    assert (rejected.state, rejected.closed_by, rejected.close_reason) == (
        RequestState.REJECTED, "bob", "no ticket")
    assert store.list_audit(request_id=r1.id)[-1].reason == "no ticket"
    with pytest.raises(RequestClosed):
        store.update_request(r1.id, lambda x: approve(x, "carol", GRANTS, t), actor="carol",
                             kind="request.approved")

    r2 = store.create_request(new_request(), actor="alice")
    with pytest.raises(NotEligible):
        store.update_request(r2.id, lambda x: cancel(x, "bob", t), actor="bob",
                             kind="request.cancelled")
    assert store.update_request(r2.id, lambda x: cancel(x, "alice", t), actor="alice",
                                kind="request.cancelled").state is RequestState.CANCELLED

    # break-glass opened by the gateway without an incident, completed by the requester
    bg = open_request(request_id=uuid.uuid4().hex, requester="dave", target=TARGET,
                      mode=Mode.BREAK_GLASS_ONLY, grants=GRANTS, now=NOW, origin="gateway")
    store.create_request(bg, actor="gateway")
    done = store.update_request(bg.id, lambda x: complete(x, "dave", t, reason="db down",
                                                          incident="INC-42"),
                                actor="dave", kind="request.completed")
    assert (done.reason, done.incident, done.origin) == ("db down", "INC-42", "user")
    assert store.update_request(bg.id, lambda x: approve(x, "erin", GRANTS, t), actor="erin",
                                kind="request.approved").state is RequestState.APPROVED

    r3 = store.create_request(new_request(), actor="alice")
    # expire() before expiry changes nothing: nothing written, no audit event
    assert store.update_request(r3.id, lambda x: expire(x, t), actor="system",
                                kind="request.expired") == r3
    assert kinds_for(store, r3.id) == ["request.created"]
    gone = store.update_request(r3.id, lambda x: expire(x, r3.expires_at), actor="system",
                                kind="request.expired")
    assert gone.state is RequestState.EXPIRED
    with pytest.raises(RequestClosed):
        store.update_request(r3.id, lambda x: approve(x, "bob", GRANTS, t), actor="bob",
                             kind="request.approved")


def test_refused_transition_writes_nothing(store):
    r = store.create_request(new_request(), actor="alice")
    before_audit = store.list_audit()
    late = r.expires_at + timedelta(seconds=1)
    with pytest.raises(RequestExpired):
        store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, late), actor="bob",
                             kind="request.approved")

    def half_then_fail(x: ApprovalRequest) -> ApprovalRequest:
        approve(x, "bob", GRANTS, NOW)  # a computed change that is then refused
        raise PolicyError("refused after computing")

    with pytest.raises(PolicyError, match="refused after computing"):
        store.update_request(r.id, half_then_fail, actor="bob", kind="request.approved")
    with pytest.raises(ValueError, match="requester"):
        store.update_request(r.id, lambda x: dataclasses.replace(x, requester="mallory"),
                             actor="mallory", kind="request.approved")
    with pytest.raises(ValueError, match="unknown audit event kind"):
        store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, NOW), actor="bob",
                             kind="request.blessed")
    with pytest.raises(UnknownRequest):
        store.update_request("missing", lambda x: x, actor="bob", kind="request.approved")
    assert store.get_request(r.id) == r
    assert store.list_audit() == before_audit


# --- audit ----------------------------------------------------------------------------------

def test_append_and_list_audit(store):
    events = [
        AuditEvent(kind="decision.allow", actor="alice", at=NOW + timedelta(seconds=i),
                   service=SVC if i % 2 else "other.v1.Svc", method="Get", outcome="allow",
                   reason=f"r{i}", detail={"rule": "x", "n": i, "nested": {"ok": True}},
                   trace_id=f"t{i}")
        for i in range(5)
    ]
    events.append(AuditEvent(kind="decision.deny", actor="bob", at=NOW + timedelta(seconds=10)))
    for e in reversed(events):  # written out of order; listed by time
        store.append_audit(e)
    assert store.list_audit() == events
    assert store.list_audit(since=NOW + timedelta(seconds=3)) == events[3:]
    assert store.list_audit(kinds=["decision.deny"]) == [events[-1]]
    assert store.list_audit(kinds=[]) == []
    assert store.list_audit(service=SVC) == [events[1], events[3]]
    assert store.list_audit(limit=2) == events[:2]


# --- durability and refusals ---------------------------------------------------------------

def test_everything_survives_close_and_reopen(backend):
    s = backend.open()
    s.put_grant(Grant("alice", Role.CONTRIBUTOR, SVC, expires_at=NOW + timedelta(days=1)))
    r = s.create_request(new_request(max_uses=5, body_sha256="ef" * 32), actor="alice")
    s.update_request(r.id, lambda x: approve(x, "bob", GRANTS, NOW), actor="bob",
                     kind="request.approved")
    s.update_request(r.id, lambda x: use(x, NOW), actor="alice", kind="request.used")
    pending = s.create_request(new_request("carol"), actor="carol")
    s.append_audit(AuditEvent(kind="decision.deny", actor="zed", at=NOW, detail={"why": "x"}))
    before = (s.list_grants(), s.grants_revision(), s.get_request(r.id), s.get_request(pending.id),
              s.list_audit())
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_request(r.id)

    again = backend.open()
    after = (again.list_grants(), again.grants_revision(), again.get_request(r.id),
             again.get_request(pending.id), again.list_audit())
    assert after == before
    assert after[2].state is RequestState.APPROVED and after[2].uses == 1
    assert after[2].approvers == ("bob",)
    # and it keeps working: spend another use after the restart
    assert again.update_request(r.id, lambda x: use(x, NOW), actor="alice",
                                kind="request.used").uses == 2


def test_naive_datetimes_are_refused(store):
    with pytest.raises(ValueError, match="naive"):
        store.put_grant(Grant("alice", Role.ENGINEER, expires_at=datetime(2030, 1, 1)))


def test_a_version_2_database_is_migrated_to_3_keeping_its_grants(backend):
    """Schema 3 adds the spends table and the auditor role to a database written by version 2
    (whose grants CHECK knew three roles), keeping every grant."""
    s = backend.open()
    s.put_grant(Grant("alice", Role.ENGINEER))
    s.close()
    old_check = "CHECK (role IN ('engineer', 'contributor', 'security_oncall'))"
    if backend.name == "sqlite":
        import sqlite3
        db = sqlite3.connect(backend.url.removeprefix("sqlite://"), isolation_level=None)
        db.executescript(f"""
            BEGIN;
            CREATE TABLE grants_v2 (principal TEXT NOT NULL, role TEXT NOT NULL {old_check},
                service TEXT NOT NULL DEFAULT '', expires_at TEXT, source TEXT NOT NULL DEFAULT 'manual',
                PRIMARY KEY (principal, role, service));
            INSERT INTO grants_v2 SELECT principal, role, service, expires_at, source FROM grants;
            DROP TABLE grants; ALTER TABLE grants_v2 RENAME TO grants;
            DROP TABLE spends; DELETE FROM schema_version; INSERT INTO schema_version VALUES (2);
            COMMIT;""")
        db.close()
    else:
        import psycopg
        with psycopg.connect(backend.url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE grants DROP CONSTRAINT grants_role_check; "
                         f"ALTER TABLE grants ADD CONSTRAINT grants_role_check {old_check}; "
                         "DROP TABLE spends; DELETE FROM schema_version; INSERT INTO schema_version VALUES (2)")
    s = backend.open()
    assert s.schema_version() == 3
    s.put_grant(Grant("audrey", Role.AUDITOR))
    assert {(g.principal, g.role) for g in s.list_grants()} == {("alice", Role.ENGINEER),
                                                                 ("audrey", Role.AUDITOR)}
    r, t = _approved(s)
    assert s.spend_use(r.id, lambda x: use(x, t), decision_id="m1", actor="alice").uses == 1


def test_both_stores_create_the_same_tables_columns_and_indexes(tmp_path, pg_dsn):
    """One schema (``policy.stores._schema``) for both dialects: a fresh SQLite file and a
    fresh PostgreSQL database hold the same tables, each with the same columns in the same
    order and NOT NULL where the other has it, and the same indexes by name (read back from
    each database's own catalog, so a table or index added to one dialect only fails here)."""
    import sqlite3

    import psycopg

    from policy.stores import open_store

    open_store(f"sqlite:///{tmp_path / 'a.db'}").close()
    open_store(pg_dsn).close()
    lite = sqlite3.connect(tmp_path / "a.db")
    tables = [t for (t,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    sqlite_side = {t: [(c[1], bool(c[3]) or bool(c[5])) for c in lite.execute(f"PRAGMA table_info({t})")]
                   for t in tables}
    sqlite_indexes = {n for (n,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                                 "AND name NOT LIKE 'sqlite_autoindex_%'")}
    lite.close()
    with psycopg.connect(pg_dsn) as pg:
        rows = pg.execute("SELECT c.table_name, c.column_name, c.is_nullable = 'NO' FROM information_schema.columns c "
                          "JOIN information_schema.tables t USING (table_schema, table_name) "
                          "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' "
                          "ORDER BY c.table_name, c.ordinal_position").fetchall()
        pg_indexes = {n for (n,) in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                                               "AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'")}
    pg_side: dict[str, list[tuple[str, bool]]] = {}
    for table, column, not_null in rows:
        pg_side.setdefault(table, []).append((column, not_null))
    assert len(sqlite_side) >= 10 and sqlite_side == pg_side
    assert "requests_open_scope" in sqlite_indexes and sqlite_indexes == pg_indexes
