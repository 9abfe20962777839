"""GrantCache: grants from memory, refreshed by the store's change feed, failing closed."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from policy import Grant, Role, StoreError
from policy.grant_cache import GrantCache
from policy.stores import open_store
from tests.conftest import free_port
from tests.support.busy_interpreter import beside_busy_thread
from tests.support.store_tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)


def eventually(check, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Wait until ``check()`` is true; return how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - started


def in_other_process(url: str, code: str) -> None:
    script = "from policy import Grant, Role\nfrom policy.stores import open_store\n" \
             f"s = open_store({url!r})\n" + textwrap.dedent(code) + "\ns.close()\n"
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)


def test_change_in_another_process_reaches_a_running_cache(backend):
    store = backend.open(poll_interval=0.2)
    store.put_grant(Grant("alice", Role.ENGINEER))
    # reload_interval is long: only the change feed can explain a quick update
    with GrantCache(store, reload_interval=60, max_staleness=120) as cache:
        assert cache.current().is_engineer("alice", NOW)
        assert not cache.current().is_engineer("zed", NOW)

        in_other_process(backend.url, 's.put_grant(Grant("zed", Role.ENGINEER))')
        took = eventually(lambda: cache.current().is_engineer("zed", NOW))
        assert took < 5

        in_other_process(backend.url, 's.delete_grant("alice", "engineer")')
        took = eventually(lambda: not cache.current().is_engineer("alice", NOW))
        assert took < 5
        assert cache.revision == store.grants_revision()


def _sneak_in_grant(backend, principal: str) -> None:
    """Insert a grant without bumping the revision, as if a notification were lost."""
    sql = ("INSERT INTO grants (principal, role, service, expires_at, source) "
           f"VALUES ('{principal}', 'engineer', '', NULL, 'manual')")
    if backend.name == "sqlite":
        with sqlite3.connect(backend.url[len("sqlite://"):]) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(backend.url) as conn:
            conn.execute(sql)


def test_periodic_reload_catches_what_notifications_missed(backend):
    store = backend.open(poll_interval=0.2)
    with GrantCache(store, reload_interval=0.5, max_staleness=30) as cache:
        _sneak_in_grant(backend, "quiet")
        eventually(lambda: cache.current().is_engineer("quiet", NOW), timeout=10)


def test_current_is_served_from_memory():
    clock = [1000.0]
    store = open_store("sqlite:///:memory:")
    store.put_grant(Grant("alice", Role.ENGINEER))
    cache = GrantCache(store, reload_interval=10, max_staleness=60, clock=lambda: clock[0]).start()
    cache.close()
    store.close()  # every further store call would raise StoreError
    assert cache.current().is_engineer("alice", NOW)
    clock[0] += 59
    assert cache.current().is_engineer("alice", NOW)
    clock[0] += 2
    with pytest.raises(StoreError, match="61s old, past the 60s max staleness"):
        cache.current()


def test_start_fails_when_the_store_cannot_be_read():
    store = open_store("sqlite:///:memory:")
    store.close()
    cache = GrantCache(store, reload_interval=1, max_staleness=5)
    with pytest.raises(StoreError, match="closed"):
        cache.start()
    with pytest.raises(StoreError, match="not been loaded"):
        cache.current()


def test_bad_settings_are_refused():
    store = open_store("sqlite:///:memory:")
    with pytest.raises(ValueError, match="max_staleness"):
        GrantCache(store, reload_interval=30, max_staleness=30)
    with pytest.raises(ValueError, match="positive"):
        GrantCache(store, reload_interval=0, max_staleness=30)
    store.close()


def test_sqlite_unreadable_past_max_staleness_fails_closed(tmp_path):
    path = tmp_path / "store.db"
    store = open_store(f"sqlite://{path}", poll_interval=0.2)
    store.put_grant(Grant("alice", Role.ENGINEER))
    store.close()
    good = path.read_bytes()
    store = open_store(f"sqlite://{path}", poll_interval=0.2)
    with GrantCache(store, reload_interval=0.3, max_staleness=1.5, retry_interval=0.2) as cache:
        assert cache.current().is_engineer("alice", NOW)
        path.write_bytes(b"\0garbage" * 4096)
        eventually(lambda: _raises_store_error(cache.current), timeout=15)
        with pytest.raises(StoreError, match="max staleness.*sqlite store"):
            cache.current()
        path.write_bytes(good)
        eventually(lambda: not _raises_store_error(cache.current), timeout=15)
        assert cache.current().is_engineer("alice", NOW)
    store.close()


@pytest.mark.postgres
def test_postgres_gone_past_max_staleness_fails_closed(pg_dsn):
    params = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(params.get("host") or "127.0.0.1", int(params.get("port") or 5432), free_port())
    proxy.start()
    store = open_store(make_conninfo(pg_dsn, host="127.0.0.1", port=str(proxy.port)),
                       connect_timeout=1, poll_interval=0.2)
    try:
        store.put_grant(Grant("alice", Role.ENGINEER))
        with GrantCache(store, reload_interval=0.3, max_staleness=2, retry_interval=0.2) as cache:
            assert cache.current().is_engineer("alice", NOW)
            proxy.stop()
            eventually(lambda: _raises_store_error(cache.current), timeout=15)
            with pytest.raises(StoreError, match="max staleness.*postgresql store"):
                cache.current()
            proxy.start()
            eventually(lambda: not _raises_store_error(cache.current), timeout=20)
            assert cache.current().is_engineer("alice", NOW)
    finally:
        store.close()
        proxy.stop()


def _raises_store_error(call) -> bool:
    try:
        call()
    except StoreError:
        return True
    return False


def test_a_full_load_runs_with_collections_held_off_and_resumes_them(tmp_path):
    """Loading every grant makes a tracked object per row: no collection may run over them
    while the load builds the new set (policy/gc_pause.py), and collections resume after."""
    import gc

    store = open_store(f"sqlite://{tmp_path}/store.db")
    store.put_grant(Grant("alice", Role.ENGINEER))
    seen: list[bool] = []
    load = store.load_grants

    def observed_load(pause=None):
        seen.append(gc.isenabled())
        return load(pause)
    store.load_grants = observed_load
    cache = GrantCache(store, reload_interval=30, max_staleness=120)
    try:
        assert gc.isenabled()
        cache.start()
        cache.refresh()
        assert seen == [False, False] and gc.isenabled()
        assert cache.current().is_engineer("alice", NOW)
    finally:
        cache.close()
        store.close()


def test_collections_paused_counts_holders_across_threads_and_keeps_a_disabled_collector_off():
    import gc
    import threading

    from policy.gc_pause import collections_paused

    entered, leave = threading.Event(), threading.Event()

    def other_holder() -> None:
        with collections_paused():
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=other_holder)
    with collections_paused():
        t.start()
        assert entered.wait(10) and not gc.isenabled()
    assert not gc.isenabled()  # the other thread still holds them off
    leave.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_sqlite_loads_every_grant_as_the_rows_say(tmp_path) -> None:
    """``load_grants`` (one JSON array from SQLite) gives what ``list_grants`` (rows) gives:
    no service, an expiry, a non-ASCII principal, each kind of role."""
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    later = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    grants = [Grant("zoë@例え.jp", Role.ENGINEER), Grant("a@x", Role.CONTRIBUTOR, "s.v1.S", later),
              Grant("a@x", Role.SECURITY_ONCALL, expires_at=later)]
    try:
        store.replace_grants("manual", grants)
        revision, loaded = store.load_grants()
        assert revision == store.grants_revision()
        assert sorted(loaded, key=repr) == sorted(store.list_grants(), key=repr)
        assert set(loaded) == set(grants)
        store.replace_grants("manual", [])
        assert store.load_grants()[1] == []
    finally:
        store.close()


def test_a_sqlite_full_load_is_not_starved_by_a_busy_interpreter(tmp_path) -> None:
    """A full reload beside threads that keep the interpreter busy (a loaded server's
    checks): reading 10,000 grants row by row waited for the interpreter lock after every
    row (51 s here); one JSON array takes one wait (0.2 s). Bound: 10 s."""
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.replace_grants("manual", [Grant(f"p{i}@x", Role.CONTRIBUTOR, f"s{i % 50}.v1.S") for i in range(10_000)])
    try:
        loaded = beside_busy_thread(lambda: len(store.load_grants()[1]), timeout=10)
        assert loaded == [10_000], "a full load of 10,000 grants took over 10 s beside a busy thread"
    finally:
        store.close()
