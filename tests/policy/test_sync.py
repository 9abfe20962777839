"""Ownership and on-call sync: catalog YAML -> grants, exact add/remove, clear refusals."""
from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from policy import Grant, Role
from policy.sync import CATALOG_SOURCE, ONCALL_SOURCE, SyncError, catalog_grants, oncall_grants, sync

CATALOG = Path(__file__).parent / "catalog"


def C(p: str, svc: str) -> Grant:
    return Grant(p, Role.CONTRIBUTOR, svc, source=CATALOG_SOURCE)


def E(p: str) -> Grant:
    return Grant(p, Role.ENGINEER, source=CATALOG_SOURCE)


EXPECTED = {
    E("jdoe@example.com"), E("asmith@example.com"), E("bwong@example.com"), E("sec1@example.com"),
    *(C(p, s) for p in ("jdoe@example.com", "asmith@example.com", "bwong@example.com")
      for s in ("pay.v1.Payments", "pay.v1.Refunds")),
    C("jdoe@example.com", "ledger.v1.Ledger"),       # owned by a user directly
    C("sec1@example.com", "sec.v1.Scanner"),
}


@pytest.fixture
def sqlite_store(tmp_path: Path):
    """The refusal tests run on SQLite only: they exercise parsing, which is store-neutral."""
    from policy.stores import open_store
    with open_store(f"sqlite://{tmp_path}/store.db") as s:
        yield s


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    shutil.copytree(CATALOG, tmp_path / "catalog")
    return tmp_path / "catalog"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_catalog_to_grants():
    result = catalog_grants([CATALOG])
    assert set(result.grants) == EXPECTED
    assert len(result.grants) == len(EXPECTED)  # no duplicates
    # "loner" is in no group and owns nothing: no grant at all
    assert not any(g.principal == "loner@example.com" for g in result.grants)
    assert result.owners == {"pay.v1.Payments": "component:default/payments-api",
                             "pay.v1.Refunds": "component:default/payments-api",
                             "ledger.v1.Ledger": "component:default/ledger",
                             "sec.v1.Scanner": "component:default/scanner"}
    # individual files work as well as directories
    files = sorted(CATALOG.rglob("*.y*ml"))
    assert set(catalog_grants(files).grants) == EXPECTED


def test_sync_adds_and_removes_exactly_and_leaves_manual_grants(store, catalog):
    manual = [Grant("jdoe@example.com", Role.CONTRIBUTOR, "pay.v1.Payments"),  # same key as a synced one
              Grant("ops@example.com", Role.ENGINEER)]
    for g in manual:
        store.put_grant(g)
    diffs = sync(store, catalog=[catalog])
    assert set(diffs[CATALOG_SOURCE].added) == EXPECTED - {C("jdoe@example.com", "pay.v1.Payments")}
    assert diffs[CATALOG_SOURCE].removed == ()
    assert set(store.list_grants()) == (EXPECTED - {C("jdoe@example.com", "pay.v1.Payments")}) | set(manual)

    # asmith leaves payments; the Refunds service moves to its own component owned by security
    groups = (catalog / "groups.yaml").read_text().replace(', "user:default/asmith"', "")
    (catalog / "groups.yaml").write_text(groups)
    comps = catalog / "components" / "payments.yaml"
    comps.write_text(comps.read_text().replace('"pay.v1.Payments, pay.v1.Refunds"', '"pay.v1.Payments"'))
    write(catalog / "components" / "refunds.yaml", """
apiVersion: backstage.io/v1alpha1
kind: Component
metadata: {name: refunds, annotations: {rpcauthz.io/grpc-services: pay.v1.Refunds}}
spec: {owner: group:security}
""")
    rev = store.grants_revision()
    diff = sync(store, catalog=[catalog])[CATALOG_SOURCE]
    assert set(diff.removed) == {E("asmith@example.com"), C("asmith@example.com", "pay.v1.Payments"),
                                 C("asmith@example.com", "pay.v1.Refunds"),
                                 C("jdoe@example.com", "pay.v1.Refunds"),
                                 C("bwong@example.com", "pay.v1.Refunds")}
    assert set(diff.added) == {C("sec1@example.com", "pay.v1.Refunds")}
    assert store.grants_revision() > rev
    assert set(manual) <= set(store.list_grants())

    # running again changes nothing
    rev = store.grants_revision()
    assert sync(store, catalog=[catalog])[CATALOG_SOURCE].added == ()
    assert store.grants_revision() == rev


def test_dry_run_writes_nothing_and_predicts_the_real_run(store, catalog, tmp_path):
    store.put_grant(Grant("old@example.com", Role.ENGINEER, source=CATALOG_SOURCE))
    oncall = write(tmp_path / "oncall.yaml", "security_oncall: [sec1@example.com]\n")
    before = store.list_grants()
    rev = store.grants_revision()
    planned = sync(store, catalog=[catalog], oncall=oncall, dry_run=True)
    assert store.list_grants() == before and store.grants_revision() == rev
    assert planned[CATALOG_SOURCE].removed == (E("old@example.com"),)
    assert sync(store, catalog=[catalog], oncall=oncall) == planned


def test_oncall_file(store, tmp_path):
    until = datetime(2030, 1, 2, 9, 0, tzinfo=UTC)
    path = write(tmp_path / "oncall.yaml", """
security_oncall:
  - sec1@example.com
  - principal: sec2@example.com
    until: 2030-01-02T09:00:00Z
  - principal: sec3@example.com
    until: "2030-01-02T10:00:00+01:00"
""")
    grants = oncall_grants(path)
    assert grants == (Grant("sec1@example.com", Role.SECURITY_ONCALL, source=ONCALL_SOURCE),
                      Grant("sec2@example.com", Role.SECURITY_ONCALL, expires_at=until, source=ONCALL_SOURCE),
                      Grant("sec3@example.com", Role.SECURITY_ONCALL, expires_at=until, source=ONCALL_SOURCE))
    store.put_grant(Grant("manual-sec@example.com", Role.SECURITY_ONCALL))
    sync(store, oncall=path)
    write(path, "security_oncall:\n  - sec2@example.com\n")
    diff = sync(store, oncall=path)[ONCALL_SOURCE]
    assert {g.principal for g in diff.removed} == {"sec1@example.com", "sec3@example.com"}
    # sec2's expiry was dropped: replaced (reported as added) with no expiry
    assert diff.added == (Grant("sec2@example.com", Role.SECURITY_ONCALL, source=ONCALL_SOURCE),)
    assert {g.principal for g in store.list_grants()} == {"sec2@example.com", "manual-sec@example.com"}
    # a bare list works too, and an empty list removes every on-call grant from the file
    write(path, "[]\n")
    assert sync(store, oncall=path)[ONCALL_SOURCE].removed == diff.added
    # the catalog's grants are not touched by an on-call sync, and vice versa
    assert [g.principal for g in store.list_grants()] == ["manual-sec@example.com"]


CATALOG_ERRORS = [
    ("bad.yaml", "kind: Group\nmetadata: {name: x\nspec: {}\n", r"bad.yaml:3: invalid YAML"),
    ("dup.yaml", "kind: User\nmetadata: {name: jdoe}\nspec: {profile: {email: j@e.com}}\n",
     r"dup.yaml:1: duplicate entity user:default/jdoe \(first defined at .*users.yaml:\d+\)"),
    ("owner.yaml", "kind: Group\nmetadata: {name: g2}\nspec: {members: []}\n---\n"
     "kind: Component\nmetadata: {name: c, annotations: {rpcauthz.io/grpc-services: a.v1.S}}\n"
     "spec: {owner: group:default/nobody}\n",
     r"owner.yaml:5: component:default/c is owned by unknown group group:default/nobody"),
    ("member.yaml", "kind: Group\nmetadata: {name: g3}\nspec: {members: [ghost]}\n",
     r"member.yaml:1: unknown user user:default/ghost"),
    ("noemail.yaml", "kind: User\nmetadata: {name: mute}\nspec: {memberOf: [payments]}\n",
     r"noemail.yaml:1: user:default/mute has no spec.profile.email"),
    ("svc.yaml", "kind: Component\nmetadata: {name: c, annotations: {rpcauthz.io/grpc-services: 'a.v1.S, /bad'}}\n"
     "spec: {owner: payments}\n", r"svc.yaml:1: component:default/c: '/bad' in rpcauthz.io/grpc-services"),
    ("twice.yaml", "kind: Component\nmetadata: {name: c2, annotations: {rpcauthz.io/grpc-services: pay.v1.Payments}}\n"
     "spec: {owner: payments}\n",
     r"twice.yaml:1: component:default/c2 claims gRPC service pay.v1.Payments, already owned by "
     r"component:default/payments-api"),
    ("noowner.yaml", "kind: Component\nmetadata: {name: c3, annotations: {rpcauthz.io/grpc-services: x.v1.X}}\n",
     r"noowner.yaml:1: component:default/c3 has no spec.owner"),
    ("list.yaml", "- kind: Group\n", r"list.yaml:1: a catalog entity must be a mapping"),
    ("noname.yaml", "kind: Group\nspec: {}\n", r"noname.yaml:1: Group has no metadata.name"),
    ("ref.yaml", "kind: Group\nmetadata: {name: g4}\nspec: {members: ['user:a/b/c']}\n",
     r"ref.yaml:1: group:default/g4 member 'user:a/b/c' is not an entity reference"),
    ("memberof.yaml", "kind: User\nmetadata: {name: u9}\nspec: {profile: {email: u9@e.com}, memberOf: [ghosts]}\n",
     r"memberof.yaml:1: user:default/u9 is memberOf unknown group group:default/ghosts"),
]


@pytest.mark.parametrize("name, text, message", CATALOG_ERRORS, ids=[c[0] for c in CATALOG_ERRORS])
def test_malformed_catalog_is_refused_and_nothing_written(sqlite_store, catalog, name, text, message):
    store = sqlite_store
    store.put_grant(Grant("keep@example.com", Role.ENGINEER, source=CATALOG_SOURCE))
    write(catalog / "zz-extra" / name, text)
    with pytest.raises(SyncError, match=message):
        sync(store, catalog=[catalog])
    assert store.list_grants() == [Grant("keep@example.com", Role.ENGINEER, source=CATALOG_SOURCE)]


def test_missing_or_empty_catalog_is_refused(tmp_path, sqlite_store):
    store = sqlite_store
    with pytest.raises(SyncError, match="no such file or directory"):
        sync(store, catalog=[tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SyncError, match="holds no .yaml"):
        sync(store, catalog=[tmp_path / "empty"])
    write(tmp_path / "other" / "x.yaml", "kind: API\nmetadata: {name: a}\n")
    with pytest.raises(SyncError, match="no Component, Group or User entities"):
        sync(store, catalog=[tmp_path / "other"])
    with pytest.raises(SyncError, match="nothing to sync"):
        sync(store)


ONCALL_ERRORS = [
    ("security_oncall: x@e.com\n", r"must be a list"),
    ("security_oncall: [a@e.com, a@e.com]\n", r"entry 2: a@e.com is listed twice"),
    ("security_oncall: [{principal: a@e.com, untl: 2030-01-01T00:00:00Z}]\n", r"entry 1: unknown keys \['untl'\]"),
    ("security_oncall: [{principal: a@e.com, until: 2030-01-01}]\n", r"needs a time and timezone"),
    ("security_oncall: [{principal: a@e.com, until: 2030-01-01T09:00:00}]\n", r"needs a timezone"),
    ("security_oncall: [{principal: a@e.com, until: soon}]\n", r"not an ISO 8601 time"),
    ("security_oncall: [{until: 2030-01-01T09:00:00Z}]\n", r"entry 1: needs a principal"),
    ("oncall: []\n", r"unknown keys \['oncall'\]"),
    ("security_oncall: [a@e.com\n", r"oncall.yaml:2: invalid YAML"),
]


@pytest.mark.parametrize("text, message", ONCALL_ERRORS)
def test_malformed_oncall_is_refused(sqlite_store, tmp_path, text, message):
    store = sqlite_store
    path = write(tmp_path / "oncall.yaml", text)
    with pytest.raises(SyncError, match=message):
        sync(store, oncall=path)
    assert store.list_grants() == []


def test_expired_oncall_entries_grant_nothing(tmp_path):
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    path = write(tmp_path / "oncall.yaml", f"security_oncall: [{{principal: a@e.com, until: '{past}'}}]\n")
    [g] = oncall_grants(path)
    assert not g.active(datetime.now(UTC))
