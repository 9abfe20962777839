"""The embedded default store: one SQLite file in WAL mode.

Several processes may open the same file (each ``mpactl serve`` worker, ``mpactl sync``):
every write transaction starts with ``BEGIN IMMEDIATE``, so a read-modify-write such as
two reviewers approving at once is serialised by SQLite's write lock, and waiting
writers retry for ``busy_timeout`` seconds before the call fails with ``StoreError``.
Grant changes are noticed by polling the grants revision (``poll_interval`` seconds).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from ..audit import AuditEvent
from ..errors import StoreError
from ..grant_delta import GrantDelta
from ..store import Subscription
from . import _codec as codec
from ._schema import SCHEMA_VERSION, schema_sql
from ._sql import _LOAD_BATCH, SqlStore

log = logging.getLogger(__name__)

_SCHEMA = schema_sql("sqlite")

#: Every grant as one JSON array of ``GRANT_COLUMNS`` arrays (``SQLiteStore._grant_row_batches``).
_GRANTS_AS_JSON = ("SELECT json_group_array(json_array(" + ", ".join(codec.GRANT_COLUMNS) + ")) FROM grants")

#: One encoder for every JSON column (``json.dumps`` with options builds a new one per call).
_JSON_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _ts_text(dt: datetime) -> str:
    # Fixed width, UTC: text order is time order, so indexes and ORDER BY work.
    return codec.utc(dt).isoformat(timespec="microseconds")


#: The oldest SQLite this store (and the audit spool) runs on: ``RETURNING`` came in 3.35.
MIN_SQLITE = (3, 35, 0)


def sqlite_problem(version: tuple[int, int, int] | None = None,
                   connect: Callable[[], sqlite3.Connection] | None = None) -> str | None:
    """Why the SQLite library Python is linked with cannot hold this project's data, or None.

    It needs ``RETURNING`` (SQLite 3.35, 2021) and the JSON functions (built in since 3.38,
    a compile option before). Python 3.11 may be linked with an older SQLite (Ubuntu 20.04:
    3.31, RHEL 8: 3.26), where the first write would fail with a bare syntax error."""
    version = sqlite3.sqlite_version_info if version is None else version
    found = ".".join(map(str, version))
    if version < MIN_SQLITE:
        return (f"SQLite {found} (the library this Python is linked with) is older than the "
                f"{'.'.join(map(str, MIN_SQLITE))} this project needs (RETURNING); use a Python linked "
                "with a newer SQLite, or the PostgreSQL store")
    conn = sqlite3.connect(":memory:") if connect is None else connect()
    try:
        conn.execute("SELECT json_group_array(json_extract('{\"a\": 1}', '$.a'))").fetchone()
    except sqlite3.Error as e:
        return (f"SQLite {found} (the library this Python is linked with) has no JSON functions "
                f"({e}); use a Python linked with an SQLite built with them, or the PostgreSQL store")
    finally:
        conn.close()
    return None


#: Most audit rows one INSERT writes (``append_audit_rows``): 512 x 11 values, under the
#: 32,766 variables SQLite has allowed by default since 3.32. Fewer where the connection's
#: SQLite allows fewer (``_rows_per_insert``).
_AUDIT_ROWS_PER_INSERT = 512


def _rows_per_insert(variable_limit: int, width: int) -> int:
    """The most rows of ``width`` values one INSERT may carry under ``variable_limit`` host
    parameters (``SQLITE_LIMIT_VARIABLE_NUMBER``: 999 before SQLite 3.32, and lowered by some
    builds), as a power of two up to ``_AUDIT_ROWS_PER_INSERT``. Raises ``StoreError`` if not
    even one row fits."""
    fits = min(_AUDIT_ROWS_PER_INSERT, variable_limit // width)
    if fits < 1:
        raise StoreError(f"this SQLite allows {variable_limit} values per statement, fewer than the "
                         f"{width} of one audit row")
    return 1 << (fits.bit_length() - 1)


@functools.cache
def _insert_audit_rows(n: int) -> str:
    """An INSERT of ``n`` audit rows, in ``AUDIT_COLUMNS`` order. Several rows per statement
    rather than an ``executemany`` of one: SQLite parses it once per batch and runs it in one
    step, ~6 µs per row against ~8.5 for the same rows one at a time (5 x 1,300 rows, the
    fast path's batches). ``append_audit_rows`` asks only for powers of two up to
    ``_AUDIT_ROWS_PER_INSERT``, so at most ten of these are ever made."""
    one = f"({', '.join('?' * len(codec.AUDIT_COLUMNS))})"
    return (f"INSERT INTO audit ({', '.join(codec.AUDIT_COLUMNS)}) VALUES {', '.join([one] * n)} "
            "ON CONFLICT (id) DO NOTHING")


def audit_row(e: AuditEvent) -> tuple[Any, ...]:
    """``e`` as ``SQLiteStore.append_audit_rows`` takes it: its values in ``AUDIT_COLUMNS``
    order, encoded as this store writes them (``at`` fixed-width UTC text, ``detail``
    compact JSON with sorted keys)."""
    params = codec.audit_params(e, _ts_text, _JSON_ENCODE)
    return tuple(params[c] for c in codec.AUDIT_COLUMNS)

_NAMED = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    """The shared ``%(name)s`` SQL in sqlite3's ``:name`` style (the same few statements
    repeat; converting each time cost more than the insert on the audit hot path)."""
    return _NAMED.sub(r":\1", sql)


class _Cursor:
    """Runs the shared ``%(name)s`` SQL on a sqlite3 connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        return self._conn.execute(_sqlite_sql(sql), params)

    def executemany(self, sql: str, seq_of_params: Any) -> sqlite3.Cursor:
        return self._conn.executemany(_sqlite_sql(sql), seq_of_params)

    def variable_limit(self) -> int:
        """How many host parameters one statement may have on this connection."""
        return self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)


class SQLiteStore(SqlStore):
    """:class:`policy.store.Store` on a SQLite file (or ``":memory:"`` for throwaway use).

    Thread-safe: each transaction borrows a connection from a small pool, so threads read
    concurrently (WAL) and writers queue on SQLite's lock. An in-memory store has a
    single connection and serialises every call.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0,
                 poll_interval: float = 0.25) -> None:
        self.path = os.fspath(path)
        super().__init__(f"sqlite store {self.path}")
        if busy_timeout <= 0 or poll_interval <= 0:
            raise ValueError("busy_timeout and poll_interval must be positive")
        problem = sqlite_problem()
        if problem is not None:
            raise StoreError(f"{self.label}: {problem}")
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self._memory = self.path == ":memory:"
        self._idle: list[sqlite3.Connection] = []
        self._all: set[sqlite3.Connection] = set()
        self._pool_lock = threading.Lock()
        self._memory_lock = threading.RLock()
        self._closed = False
        self._subscriptions: list[_Poller] = []
        self._init_schema()

    # --- connections and transactions -------------------------------------------------------
    def _error(self, e: BaseException) -> StoreError:
        return StoreError(f"{self.label}: {e}")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if not self._memory:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e) from e
        return conn

    def _acquire(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StoreError(f"{self.label}: the store is closed")
            if self._idle:
                return self._idle.pop()
            if self._memory and self._all:
                # one shared connection, guarded by _memory_lock in _tx
                return next(iter(self._all))
        conn = self._connect()
        with self._pool_lock:
            self._all.add(conn)
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if self._closed:
                self._all.discard(conn)
                conn.close()
            elif not self._memory:
                self._idle.append(conn)

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[_Cursor]:
        lock = self._memory_lock if self._memory else contextlib.nullcontext()
        with lock:
            conn = self._acquire()
            try:
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                except sqlite3.Error as e:
                    raise self._error(e) from e
                try:
                    yield _Cursor(conn)
                except sqlite3.Error as e:
                    self._rollback(conn)
                    raise self._error(e) from e
                except BaseException:
                    self._rollback(conn)
                    raise
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as e:
                    self._rollback(conn)
                    raise self._error(e) from e
            finally:
                self._release(conn)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _init_schema(self) -> None:
        with self._tx(write=True) as cur:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            version = cur.execute("SELECT max(version) AS v FROM schema_version").fetchone()["v"]
            if version is None or version < SCHEMA_VERSION:
                # 1 -> 2 added the grant change log and indexes, 2 -> 3 the spends table,
                # all created above if missing, and the auditor role:
                self._allow_auditor_role(cur)
                cur.execute("INSERT INTO schema_version (version) VALUES (%(v)s)", {"v": SCHEMA_VERSION})
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.label}: schema version {version} is newer than this "
                                 f"program understands ({SCHEMA_VERSION}); upgrade rpcauthz")

    @staticmethod
    def _allow_auditor_role(cur: _Cursor) -> None:
        """Schema 3: rebuild ``grants`` if its role CHECK predates the auditor role (SQLite
        cannot alter a constraint), keeping every row."""
        sql = cur.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'grants'"
                          ).fetchone()["sql"]
        if "'auditor'" in sql:
            return
        create = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS grants ("):]
        create = create[:create.index(";")].replace("IF NOT EXISTS grants (", "grants_v3 (")
        cur.execute(create)
        cur.execute("INSERT INTO grants_v3 (principal, role, service, expires_at, source) "
                    "SELECT principal, role, service, expires_at, source FROM grants")
        cur.execute("DROP TABLE grants")
        cur.execute("ALTER TABLE grants_v3 RENAME TO grants")

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._tx(write=False) as cur:
            return int(cur.execute("SELECT max(version) AS v FROM schema_version").fetchone()["v"])

    # --- dialect ---------------------------------------------------------------------------
    # All the events in one statement, through json_each of the array: one statement step.
    # One event per row of an executemany cost less CPU (~11 µs per event, against ~16), but
    # Python's sqlite3 lets go of the interpreter lock around every step, and beside busy
    # threads each step waited for it again: shipping 5,000 spooled events took 77 s beside
    # a busy thread (tests/extauthz/test_audit_spool.py). The WHERE is SQLite's: an upsert
    # after INSERT ... SELECT needs one to parse. append_audit_json takes ``at`` in the
    # fixed-width UTC form _ts writes and ``detail`` encoded as _json_in encodes it
    # (json_extract gives it back as it was sent).
    _INSERT_AUDIT_JSON = (f"INSERT INTO audit ({', '.join(codec.AUDIT_COLUMNS)}) SELECT "
                          + ", ".join(f"json_extract(value, '$.{c}')" for c in codec.AUDIT_COLUMNS)
                          + " FROM json_each(%(events)s) WHERE true ON CONFLICT (id) DO NOTHING")

    def _grant_row_batches(self, cur: Any) -> Iterator[Sequence[Mapping[str, Any]]]:
        """``SqlStore._grant_row_batches``, the rows handed over as one JSON array (one
        statement step). Python's sqlite3 lets go of the interpreter lock around every step,
        so a row-by-row read waits for the lock again after each row; while other threads keep
        it busy (a loaded server's checks) each wait lasts up to the switch interval: a full
        reconcile of 30,000 grants took 76 s beside running checks in bench/scale_bench.py
        (0.5 s at the demo's size)."""
        text = cur.execute(_GRANTS_AS_JSON).fetchone()[0]
        rows = json.loads(text) if text else []
        columns = codec.GRANT_COLUMNS
        for at in range(0, len(rows), _LOAD_BATCH):
            yield [dict(zip(columns, r, strict=True)) for r in rows[at:at + _LOAD_BATCH]]

    def append_audit_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Write several audit events given as their column values in one transaction: each
        row in ``AUDIT_COLUMNS`` order, ``at`` the text ``append_audit_json`` takes (UTC,
        microseconds, ``+00:00``) and ``detail`` compact JSON with sorted keys, ASCII (as the
        audit spool's canonical rows hold them). SQLite decodes JSON in this process, so a
        caller that has the values (the fast path's access log) skips ~4 µs per event of
        ``json_extract``. An id the store holds is skipped, as in ``append_audits``. Raises
        ``ValueError`` for a row without one value per column (nothing is written)."""
        if not rows:
            return
        width = len(codec.AUDIT_COLUMNS)
        bad = next((i for i, row in enumerate(rows) if len(row) != width), None)
        if bad is not None:  # flattened, a short row would shift the rest
            raise ValueError(f"audit row {bad} has {len(rows[bad])} values, not one per column ({width})")
        with self._tx(write=True) as cur:
            most = _rows_per_insert(cur.variable_limit(), width)
            at = 0
            while at < len(rows):
                n = most
                while n > len(rows) - at:
                    n //= 2
                cur.execute(_insert_audit_rows(n), list(itertools.chain.from_iterable(rows[at:at + n])))
                at += n

    def _ts(self, dt: datetime) -> str:
        return _ts_text(dt)

    def _dt(self, value: Any) -> datetime:
        return datetime.fromisoformat(value)

    def _json_in(self, obj: Any) -> str:
        return _JSON_ENCODE(obj)

    def _json_out(self, value: Any) -> Any:
        import json
        return json.loads(value)

    # --- change notification ---------------------------------------------------------------
    def watch_grant_deltas(self, on_delta: Callable[[GrantDelta], None]) -> Subscription:
        """Poll the grants revision every ``poll_interval`` s; when it moves, call ``on_delta``
        with a delta that does not carry the changes (the receiver reads them from the change
        log with ``grant_changes_since``).

        A poll that fails is logged and retried; the first successful poll after a failure
        reports the revision even if it did not move, so the caller catches up.
        """
        poller = _Poller(self, on_delta, self.poll_interval)
        self._subscriptions.append(poller)
        poller.start()
        return poller

    def close(self) -> None:
        """Stop watchers and close every idle connection; later calls raise ``StoreError``."""
        for sub in self._subscriptions:
            sub.close()
        with self._pool_lock:
            self._closed = True
            for conn in self._idle:
                self._all.discard(conn)
                conn.close()
            self._idle.clear()
            if self._memory:
                for conn in self._all:
                    conn.close()
                self._all.clear()


class _Poller:
    """A thread that polls ``grants_revision`` and reports changes."""

    def __init__(self, store: SQLiteStore, on_delta: Callable[[GrantDelta], None],
                 interval: float) -> None:
        self._store = store
        self._on_delta = on_delta
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-grants-poller", daemon=True)
        self._last: int | None = None

    def start(self) -> None:
        try:
            self._last = self._store.grants_revision()
        except StoreError as e:
            log.warning("grant watcher: %s (will retry)", e)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                revision = self._store.grants_revision()
            except StoreError as e:
                if self._stop.is_set():
                    return
                log.warning("grant watcher: %s (will retry)", e)
                self._last = None
                continue
            if revision != self._last:
                since = self._last if self._last is not None and self._last <= revision else revision
                self._last = revision
                try:
                    self._on_delta(GrantDelta(since, revision, None))
                except Exception:  # the callback's failure must not stop the watcher
                    log.exception("grant watcher callback failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
