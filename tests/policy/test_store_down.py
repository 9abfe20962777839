"""A store that cannot be reached or read fails loudly with StoreError, never a default."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from policy import Grant, Role, StoreError
from policy.stores import open_store
from tests.conftest import free_port
from tests.support.pg_session import statement_timeout_of
from tests.support.store_tcp_proxy import TcpProxy

# --- open_store refusals ------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("", "store URL is required"),
    ("mysql://u@h/db", "unsupported store URL"),
    ("redis://h:6379", "unsupported store URL"),
    ("/var/lib/store.db", "unsupported store URL"),
    ("sqlite:relative.db", "malformed SQLite store URL"),
    ("sqlite://relative.db", "absolute path"),
    ("sqlite:///", "absolute path"),
    ("sqlite:///tmp/x.db?mode=ro", "no query string"),
])
def test_open_store_refuses_urls_it_does_not_understand(url, message):
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_open_store_never_echoes_a_password():
    with pytest.raises(ValueError) as e:
        open_store("mysql://app:hunter2@db/x")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


def test_an_sqlite_too_old_or_without_json_is_refused_by_name_before_any_write(tmp_path, monkeypatch):
    """Python 3.11 may be linked with an SQLite older than RETURNING (3.35; Ubuntu 20.04 has
    3.31.1) or built without the JSON functions: the store and the audit spool say so when
    opened, not with a bare syntax error at the first write."""
    from extauthz.audit_spool import AuditSpool
    from policy.stores.sqlite import sqlite_problem

    assert sqlite_problem() is None  # this machine's SQLite
    old = sqlite_problem((3, 31, 1))
    assert old is not None and "SQLite 3.31.1" in old and "older than the 3.35.0" in old

    def without_json() -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:")

        def missing(*_args):
            raise sqlite3.OperationalError("no such function: json_extract")
        conn.create_function("json_extract", 2, missing)
        return conn
    no_json = sqlite_problem((3, 37, 2), without_json)
    assert no_json is not None and "SQLite 3.37.2" in no_json and "no JSON functions" in no_json

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(StoreError, match=r"store .*store\.db: SQLite 3\.31\.1 .* older than the 3\.35\.0"):
        open_store(f"sqlite:///{tmp_path / 'store.db'}")
    with pytest.raises(OSError, match=r"cannot open the audit spool .*spool\.db: SQLite 3\.31\.1"):
        AuditSpool(str(tmp_path / "spool.db"), 10)
    assert not (tmp_path / "store.db").exists() and not (tmp_path / "spool.db").exists()


def test_open_store_refuses_unknown_options(tmp_path):
    with pytest.raises(TypeError, match="poll_intervall"):
        open_store(f"sqlite://{tmp_path}/s.db", poll_intervall=1)


def test_sqlite_url_forms(tmp_path):
    for url in (f"sqlite://{tmp_path}/a.db", f"sqlite:///{tmp_path}/a.db"):
        with open_store(url) as s:
            s.put_grant(Grant("alice", Role.ENGINEER))
    assert (tmp_path / "a.db").exists()
    with open_store(f"sqlite://{tmp_path}/a.db") as s:
        assert s.list_grants() == [Grant("alice", Role.ENGINEER)]
    with open_store("sqlite:///:memory:") as m:
        m.put_grant(Grant("bob", Role.ENGINEER))
        assert m.list_grants() == [Grant("bob", Role.ENGINEER)]


# --- SQLite -------------------------------------------------------------------------------

def test_sqlite_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "store.db"
    with pytest.raises(StoreError, match=f"sqlite store {path}.*unable to open"):
        open_store(f"sqlite://{path}")


def test_sqlite_path_is_a_directory(tmp_path):
    with pytest.raises(StoreError, match=f"sqlite store {tmp_path}"):
        open_store(f"sqlite://{tmp_path}")


def test_sqlite_corrupt_file(tmp_path):
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a database\n" * 500)
    with pytest.raises(StoreError, match="not a database"):
        open_store(f"sqlite://{path}")


def test_sqlite_file_corrupted_under_a_running_store(tmp_path):
    path = tmp_path / "store.db"
    s = open_store(f"sqlite://{path}")
    s.put_grant(Grant("alice", Role.ENGINEER))
    s.close()
    s = open_store(f"sqlite://{path}")
    for name in ("store.db-wal", "store.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    path.write_bytes(b"\0garbage" * 4096)
    with pytest.raises(StoreError, match=f"sqlite store {path}"):
        s.list_grants()
    s.close()


def test_sqlite_locked_past_busy_timeout_is_an_error(tmp_path):
    path = tmp_path / "store.db"
    s = open_store(f"sqlite://{path}", busy_timeout=0.3)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            s.put_grant(Grant("alice", Role.ENGINEER))
        assert time.monotonic() - started < 10
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    s.put_grant(Grant("alice", Role.ENGINEER))  # and it recovers once the lock is gone
    assert s.list_grants() == [Grant("alice", Role.ENGINEER)]
    s.close()


def test_sqlite_newer_schema_is_refused(tmp_path):
    path = tmp_path / "store.db"
    open_store(f"sqlite://{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        open_store(f"sqlite://{path}")


# --- PostgreSQL ---------------------------------------------------------------------------

@pytest.mark.postgres
def test_postgres_closed_port(pg_server_dsn):
    port = free_port()
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/rpcauthz"
    started = time.monotonic()
    with pytest.raises(StoreError) as e:
        open_store(url, connect_timeout=2)
    message = str(e.value)
    assert f"postgresql store postgresql://app:***@127.0.0.1:{port}/rpcauthz" in message
    assert "refused" in message.lower()
    assert "s3cret" not in message
    assert time.monotonic() - started < 15


@pytest.mark.postgres
def test_postgres_connections_carry_tcp_timeouts_unless_the_dsn_sets_them(pg_dsn):
    """A server that vanishes mid-call must fail the call within seconds, not TCP's ~15
    minutes: every pooled connection (and the LISTEN one) asks libpq for keepalives and a
    TCP user timeout; a DSN's own value wins."""
    from policy.stores.postgres import TCP_DEFAULTS, PostgresStore

    store = PostgresStore(pg_dsn)
    try:
        with store._pool.connection() as conn:
            params = conn.info.get_parameters()
        listener = store.connect()
        try:
            listen_params = listener.info.get_parameters()
        finally:
            listener.close()
    finally:
        store.close()
    for got in (params, listen_params):
        assert {k: got.get(k) for k in TCP_DEFAULTS} == {k: str(v) for k, v in TCP_DEFAULTS.items()}, got

    own = make_conninfo(pg_dsn, keepalives_idle=60, tcp_user_timeout=5000)
    store = PostgresStore(own)
    try:
        with store._pool.connection() as conn:
            params = conn.info.get_parameters()
    finally:
        store.close()
    assert (params.get("keepalives_idle"), params.get("tcp_user_timeout"), params.get("keepalives_count")) == \
        ("60", "5000", str(TCP_DEFAULTS["keepalives_count"]))


@pytest.mark.parametrize("in_dsn, option", [(True, None), (False, 0.3)], ids=["dsn", "store-option"])
def test_a_statement_timeout_turns_a_locked_table_into_a_store_error(pg_dsn, in_dsn, option):
    """A server that is alive but does not answer (here: a table locked by another session)
    is bounded by PostgreSQL's own statement_timeout, set in the DSN as docs/store.md says or
    given by the store (the servers' ``store_statement_timeout_s``): the call fails with a
    StoreError that says so and PostgreSQL cancels the statement, instead of it holding its
    thread; the lock gone, the same store answers."""
    import psycopg

    dsn = make_conninfo(pg_dsn, options="-c statement_timeout=300") if in_dsn else pg_dsn
    store = open_store(dsn, statement_timeout=option)
    locker = psycopg.connect(pg_dsn)
    try:
        assert statement_timeout_of(store) == "300ms"
        store.grants_revision()  # the schema exists and the store answers
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreError, match="statement timeout"):
            store.list_grants()
        assert time.monotonic() - started < 10
        # cancelled on the server: nothing of ours still waits on the lock
        waiting = locker.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND application_name = 'rpcauthz'").fetchone()
        assert waiting == (0,)
        locker.execute("ROLLBACK")
        assert isinstance(store.list_grants(), list)
    finally:
        locker.close()
        store.close()


def test_a_statement_timeout_of_the_dsn_or_the_role_wins_over_the_stores(pg_dsn):
    import psycopg

    from_dsn = open_store(make_conninfo(pg_dsn, options="-c statement_timeout=7000"), statement_timeout=0.3)
    try:
        assert statement_timeout_of(from_dsn) == "7s"
    finally:
        from_dsn.close()
    role = f"rpcauthz_t_role_{time.monotonic_ns()}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
        admin.execute(f'ALTER ROLE "{role}" SET statement_timeout = 9000')
    try:
        as_role = open_store(make_conninfo(pg_dsn, user=role), statement_timeout=0.3)
        try:
            assert statement_timeout_of(as_role) == "9s"
        finally:
            as_role.close()
        unbounded = open_store(pg_dsn)
        try:
            assert statement_timeout_of(unbounded) == "0"  # None: PostgreSQL's own default
        finally:
            unbounded.close()
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{role}"')


@pytest.mark.parametrize("bad", [0, -1, 0.0001, float("nan"), float("inf"), 3e6])
def test_a_store_statement_timeout_postgresql_cannot_take_is_refused(pg_dsn, bad):
    with pytest.raises(ValueError, match=r"statement_timeout must be 0.001 to 2,000,000 s \(or None: none\)"):
        open_store(pg_dsn, statement_timeout=bad)


def test_postgres_server_gone_then_back(pg_dsn):
    params = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432), free_port())
    proxy.start()
    via_proxy = make_conninfo(pg_dsn, host="127.0.0.1", port=str(proxy.port))
    s = open_store(via_proxy, connect_timeout=1, poll_interval=0.2)
    direct = open_store(pg_dsn)
    seen: list[int] = []
    got = threading.Event()
    sub = s.watch_grants(lambda rev: (seen.append(rev), got.set()))
    try:
        assert sub.wait_connected(10)
        s.put_grant(Grant("alice", Role.ENGINEER))
        assert s.list_grants() == [Grant("alice", Role.ENGINEER)]
        assert got.wait(10)

        proxy.stop()
        for call in (s.list_grants, lambda: s.get_request("x"),
                     lambda: s.put_grant(Grant("bob", Role.ENGINEER))):
            started = time.monotonic()
            with pytest.raises(StoreError, match="postgresql store"):
                call()
            assert time.monotonic() - started < 15

        # a change made elsewhere while the listener is cut off ...
        got.clear()
        direct.put_grant(Grant("carol", Role.ENGINEER))
        time.sleep(0.5)
        proxy.start()
        # ... is reported once the listener reconnects, and the pool serves again
        assert got.wait(20), "listener did not report after reconnecting"
        assert seen[-1] == direct.grants_revision()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert {g.principal for g in s.list_grants()} == {"alice", "carol"}
                break
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        sub.close()
        s.close()
        direct.close()
        proxy.stop()


def test_sqlite_unwritable_location():
    # /proc accepts no new files, even for root
    with pytest.raises(StoreError, match="sqlite store /proc/rpcauthz-store.db.*unable to open"):
        open_store("sqlite:///proc/rpcauthz-store.db")
