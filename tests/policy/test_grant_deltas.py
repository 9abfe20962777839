"""Grant changes travel as deltas: the store's change log and feed, GrantSet.apply, and a
GrantCache that follows them without reloading every grant."""
from __future__ import annotations

import gc
import random
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from policy import Grant, GrantSet, Role
from policy.grant_cache import GrantCache
from policy.grant_delta import GrantChange, GrantDelta
from tests.policy.test_grant_cache import eventually, in_other_process

NOW = datetime.now(UTC)
LATER = NOW + timedelta(days=1)


def _audit_count(store) -> int:
    return len(store.list_audit(limit=100_000))


def test_change_log_carries_every_change_in_order(store):
    rev0 = store.grants_revision()
    store.put_grant(Grant("alice", Role.ENGINEER))
    store.put_grant(Grant("bob", Role.CONTRIBUTOR, "pay.v1.Pay", expires_at=LATER))
    store.delete_grant("alice", Role.ENGINEER)
    delta = store.grant_changes_since(rev0)
    assert (delta.since, delta.revision) == (rev0, rev0 + 3)
    assert [(c.deleted, c.grant.principal, c.grant.role) for c in delta.changes] == [
        (False, "alice", Role.ENGINEER), (False, "bob", Role.CONTRIBUTOR), (True, "alice", Role.ENGINEER)]
    assert delta.changes[1].grant.expires_at == LATER
    assert store.grant_changes_since(rev0 + 3) == GrantDelta(rev0 + 3, rev0 + 3, ())
    # a revision the store never had, or one older than the log reaches: reload everything
    assert store.grant_changes_since(rev0 + 99) is None
    with store._tx(write=True) as cur:
        cur.execute("UPDATE grant_changes_floor SET revision = %(r)s", {"r": rev0 + 1})
    assert store.grant_changes_since(rev0) is None
    assert store.grant_changes_since(rev0 + 1).revision == rev0 + 3


def test_replace_grants_writes_only_the_difference(store):
    first = [Grant(f"u{i}", Role.ENGINEER, source="sync:catalog") for i in range(300)]
    diff = store.replace_grants("sync:catalog", first)
    assert len(diff.added) == 300
    rev, audits = store.grants_revision(), _audit_count(store)
    assert store.replace_grants("sync:catalog", first).added == ()
    assert (store.grants_revision(), _audit_count(store)) == (rev, audits)  # a no-op: nothing written
    second = first[1:] + [Grant("new", Role.ENGINEER, source="sync:catalog")]
    diff = store.replace_grants("sync:catalog", second)
    assert ([g.principal for g in diff.removed], [g.principal for g in diff.added]) == (["u0"], ["new"])
    assert store.grants_revision() == rev + 1 and _audit_count(store) == audits + 2
    delta = store.grant_changes_since(rev)
    assert [(c.deleted, c.grant.principal) for c in delta.changes] == [(True, "u0"), (False, "new")]
    assert set(store.list_grants()) == set(second)


def test_grant_set_apply_matches_a_fresh_build():
    rng = random.Random(7)
    principals = [f"p{i}" for i in range(30)]
    services = [f"s{i}.v1.S" for i in range(5)]

    def some_grant() -> Grant:
        role = rng.choice(list(Role))
        service = rng.choice(services) if role is Role.CONTRIBUTOR else None
        return Grant(rng.choice(principals), role, service,
                     rng.choice([None, LATER, NOW - timedelta(seconds=1)]))
    truth = {g.key: g for g in (some_grant() for _ in range(60))}
    held = GrantSet(truth.values(), revision=1)
    for rev in range(2, 40):
        changes = []
        for _ in range(rng.randint(1, 4)):
            if truth and rng.random() < 0.4:
                g = truth.pop(rng.choice(sorted(truth)))
                changes.append(GrantChange(g, deleted=True))
            else:
                g = some_grant()
                truth[g.key] = g
                changes.append(GrantChange(g))
        def answers(gs: GrantSet) -> list[bool]:  # what the hot path asks (its flat indexes)
            return [gs.has(p, r, NOW, s if r is Role.CONTRIBUTOR else None)
                    for p in principals for r in Role for s in services]
        before, answered = list(held), answers(held)
        new = held.apply(GrantDelta(rev - 1, rev, tuple(changes)))
        # the old set is untouched for readers still holding it
        assert list(held) == before and answers(held) == answered
        held = new
        fresh = GrantSet(truth.values(), revision=rev)
        assert list(held) == list(fresh) and len(held) == len(fresh) == len(truth)
        assert answers(held) == answers(fresh)
        for p in principals:  # what the approvals pages show, grouped on first use per set
            assert set(held.roles_of(p, NOW)) == set(fresh.roles_of(p, NOW)) == {
                g for g in truth.values() if g.principal == p and g.active(NOW)}
        for p in principals:
            assert held.is_engineer(p, NOW) == fresh.is_engineer(p, NOW)
            assert held.is_security_oncall(p, NOW) == fresh.is_security_oncall(p, NOW)
            for s in services:
                assert held.is_contributor(p, s, NOW) == fresh.is_contributor(p, s, NOW)
    with pytest.raises(ValueError, match="starts at revision"):
        held.apply(GrantDelta(1, 2, ()))
    with pytest.raises(ValueError, match="does not carry"):
        held.apply(GrantDelta(held.revision, held.revision + 1, None))


def test_grant_indexes_hold_nothing_the_collector_walks():
    """A reload's index must not be walked by the next collection (a pause of every check:
    29-51 ms at 30,000 grants with tuple keys): the tables are untracked dicts."""
    grants = [Grant(f"p{i}", Role.ENGINEER) for i in range(50)]
    grants += [Grant(f"p{i}", Role.CONTRIBUTOR, f"s{i % 7}.v1.S", LATER if i % 2 else None, "sync:catalog")
               for i in range(50)]
    grants += [Grant("p1", Role.SECURITY_ONCALL, expires_at=LATER, source="sync:oncall")]
    built = GrantSet(grants, revision=1)
    applied = built.apply(GrantDelta(1, 2, (
        GrantChange(Grant("q", Role.CONTRIBUTOR, "s1.v1.S", NOW + timedelta(hours=1))),
        GrantChange(Grant("p3", Role.ENGINEER), deleted=True))))
    for gs in (built, applied):
        assert not any(gc.is_tracked(t) for t in (gs._engineers, gs._contributors, gs._others))
    assert applied.is_contributor("q", "s1.v1.S", NOW) and not applied.is_engineer("p3", NOW)
    assert built.is_engineer("p3", NOW) and built.is_security_oncall("p1", NOW)
    assert built.is_contributor("p1", "s1.v1.S", NOW) and not built.is_contributor("p1", "s2.v1.S", NOW)


def test_a_nul_in_a_grant_cannot_stand_for_another_grant():
    """Keys join principal and service with a NUL: a grant holding one is left out, so
    ("a\0b", "c") cannot answer for ("a", "b\0c") and no question with a NUL matches."""
    gs = GrantSet([Grant("a\0b", Role.CONTRIBUTOR, "c"), Grant("x", Role.CONTRIBUTOR, "y\0z"),
                   Grant("e\0", Role.ENGINEER), Grant("o\0", Role.SECURITY_ONCALL),
                   Grant("a", Role.CONTRIBUTOR, "c")])
    assert list(gs) == [Grant("a", Role.CONTRIBUTOR, "c")]
    assert gs.is_contributor("a", "c", NOW)
    assert not gs.is_contributor("a", "b\0c", NOW) and not gs.is_contributor("x\0y", "z", NOW)
    assert not gs.is_contributor("a\0b", "c", NOW) and not gs.is_contributor("x", "y\0z", NOW)
    assert not gs.is_engineer("e\0", NOW) and not gs.is_security_oncall("o\0", NOW)
    assert not gs.has("a\0c", Role.CONTRIBUTOR, NOW, "")


def test_delta_wire_form_round_trips_and_bad_input_is_refused():
    d = GrantDelta(4, 5, (GrantChange(Grant("a@x", Role.CONTRIBUTOR, "p.v1.S", LATER, "sync:catalog")),
                          GrantChange(Grant("b@x", Role.ENGINEER), deleted=True)))
    assert GrantDelta.from_json(d.to_json()) == d
    assert len(GrantDelta(4, 5, (d.changes[1],)).to_json()) < 80  # one change, one small update
    assert GrantDelta.from_json(GrantDelta(4, 5, None).to_json()) == GrantDelta(4, 5, None)
    assert GrantDelta.from_json("12") == GrantDelta(11, 12, None)  # an older writer's payload
    for bad in ("", "{}", '{"s":1,"r":2,"c":[["?","a","engineer","",null,"manual"]]}',
                '{"s":1,"r":2,"c":[["+","a","wizard","",null,"manual"]]}', "[1]"):
        with pytest.raises(ValueError, match="malformed grant delta"):
            GrantDelta.from_json(bad)


def test_cache_follows_changes_as_deltas_without_reloading(backend):
    store = backend.open(poll_interval=0.1)
    store.put_grant(Grant("alice", Role.ENGINEER))
    with GrantCache(store, reload_interval=60, max_staleness=120) as cache:
        in_other_process(backend.url, 's.put_grant(Grant("zed", Role.ENGINEER))')
        eventually(lambda: cache.current().is_engineer("zed", NOW))
        in_other_process(backend.url, 's.delete_grant("alice", "engineer")')
        eventually(lambda: not cache.current().is_engineer("alice", NOW))
        assert cache.revision == store.grants_revision()
        assert cache.stats["full_loads"] == 1  # only the start
        if backend.name == "postgresql":  # the NOTIFY payload carried the change itself
            assert cache.stats["deltas_applied"] >= 2
        else:  # the poll saw the revision move; the change log said what moved
            assert cache.stats["log_catch_ups"] >= 2


@pytest.mark.postgres
def test_a_batch_too_big_for_notify_is_read_from_the_change_log(pg_dsn):
    from policy.stores import open_store
    store = open_store(pg_dsn, poll_interval=0.1)
    seen: list[GrantDelta] = []
    try:
        with GrantCache(store, reload_interval=60, max_staleness=120) as cache:
            sub = store.watch_grant_deltas(seen.append)
            sub.wait_connected(10)
            many = [Grant(f"user{i}@example.com", Role.ENGINEER, source="sync:catalog") for i in range(500)]
            store.replace_grants("sync:catalog", many)
            eventually(lambda: cache.current().is_engineer("user499@example.com", NOW))
            assert len(cache.current()) == 500 and cache.stats["full_loads"] == 1
            assert cache.stats["log_catch_ups"] >= 1
            eventually(lambda: bool(seen))
            assert seen[-1].changes is None and seen[-1].revision == store.grants_revision()
            sub.close()
    finally:
        store.close()


@pytest.mark.postgres
def test_notify_payload_limit_is_respected(pg_dsn):
    """PostgreSQL refuses payloads of 8000 bytes; a big batch must still commit."""
    from policy.stores import open_store
    store = open_store(pg_dsn)
    try:
        long = [Grant(f"{'x' * 200}{i}@example.com", Role.ENGINEER, source="s") for i in range(100)]
        store.replace_grants("s", long)
        assert len(store.list_grants()) == 100
    finally:
        store.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM grant_changes").fetchone()[0] == 100


_CATALOG = """\
kind: Group
metadata: {name: pay}
spec: {members: [ann]}
---
kind: User
metadata: {name: ann}
spec: {profile: {email: ann@example.com}}
---
kind: Component
metadata: {name: payments, annotations: {rpcauthz.io/grpc-services: pay.v1.Pay}}
spec: {owner: pay}
"""


def test_unchanged_catalog_is_not_parsed_again(store, tmp_path, monkeypatch):
    from policy import sync as sync_module
    cat = tmp_path / "catalog.yaml"
    cat.write_text(_CATALOG)
    diffs = sync_module.sync(store, catalog=[cat])
    assert len(diffs["sync:catalog"].added) == 2
    rev, audits = store.grants_revision(), _audit_count(store)
    real = sync_module.catalog_grants
    calls = []
    monkeypatch.setattr(sync_module, "catalog_grants", lambda paths: calls.append(paths) or real(paths))

    assert sync_module.sync(store, catalog=[cat])["sync:catalog"] == sync_module.GrantDiff()
    assert calls == [] and (store.grants_revision(), _audit_count(store)) == (rev, audits)

    store.put_grant(Grant("hand", Role.ENGINEER))  # someone changed grants: parse again
    sync_module.sync(store, catalog=[cat])
    assert len(calls) == 1
    sync_module.sync(store, catalog=[cat])
    assert len(calls) == 1  # and recorded again at the new revision

    cat.write_text(_CATALOG.replace("members: [ann]", "members: []"))  # the file changed
    diffs = sync_module.sync(store, catalog=[cat])
    assert len(calls) == 2 and len(diffs["sync:catalog"].removed) == 2


def test_the_contributor_table_keeps_its_hashes_beside_its_keys_and_the_marker_never_shows():
    """The contributor table holds one int key so CPython stores each key's hash in the
    table (a miss then touches no key object: bench/warm_check_misses.py). That key is no
    grant: not counted, not listed, not askable, and kept by every set ``apply`` makes,
    including one with no contributor left."""
    grants = [Grant("p", Role.ENGINEER), Grant("p", Role.CONTRIBUTOR, "s.v1.S"),
              Grant("q", Role.CONTRIBUTOR, "s.v1.S", LATER, "sync:catalog")]
    built = GrantSet(grants, revision=1)
    emptied = built.apply(GrantDelta(1, 2, tuple(GrantChange(g, deleted=True) for g in grants[1:])))
    for gs, expected in ((built, grants), (emptied, grants[:1])):
        assert any(type(k) is not str for k in gs._contributors)  # the layout's marker is there
        assert sorted(gs, key=repr) == sorted(expected, key=repr)
        assert len(gs) == len(expected)
        assert not gs.has("", Role.CONTRIBUTOR, NOW, "") and not gs.is_contributor("0", "", NOW)
    assert built.roles_of("q", NOW) == [grants[2]] and emptied.roles_of("q", NOW) == []
