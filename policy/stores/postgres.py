"""The shared store for several gateway replicas: PostgreSQL through psycopg 3.

Read-modify-writes lock the request row (``SELECT ... FOR UPDATE``) for the length of
the transaction; concurrent ``get_or_create_pending`` callers with one scope are
serialised by a transaction-scoped advisory lock. Every grant change bumps
``grants_revision`` and sends ``NOTIFY rpcauthz_grants, '<revision>'`` in the same
transaction, so listeners hear about it only once it is committed.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..errors import StoreError
from ..grant_delta import GrantDelta
from ..store import Subscription
from . import _codec as codec
from . import redact_url
from ._schema import SCHEMA_VERSION, schema_sql
from ._sql import SqlStore

log = logging.getLogger(__name__)

#: The NOTIFY channel grant changes are announced on; the payload is the change's
#: ``GrantDelta.to_json()``, without the changes when they would not fit.
CHANNEL = "rpcauthz_grants"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; bigger batches announce only
#: the revision and listeners read the changes from the change log.
MAX_PAYLOAD = 7900
#: Advisory lock key that serialises schema creation by replicas starting together.
_SCHEMA_LOCK = 0x7270_6361_7574_687A & 0x7FFF_FFFF_FFFF_FFFF

_Row = TypeVar("_Row")


def _one(row: _Row | None, query: str) -> _Row:
    """The row of a query that always returns one (an aggregate, the singleton revision row)."""
    if row is None:
        raise StoreError(f"PostgreSQL returned no row for {query!r}")
    return row


_SCHEMA = schema_sql("postgres")


#: Schema 3 allows the auditor role (the column's CHECK constraint as PostgreSQL named it).
_ROLE_CHECK_V3 = """
ALTER TABLE grants DROP CONSTRAINT IF EXISTS grants_role_check;
ALTER TABLE grants ADD CONSTRAINT grants_role_check
    CHECK (role IN ('engineer', 'contributor', 'security_oncall', 'auditor'));
"""


#: libpq's TCP settings for every connection, each unless the DSN sets it: a server that
#: vanishes mid-call (a failed-over primary whose address is gone, a dropped network path)
#: fails the call within ~30 s (``tcp_user_timeout``: sent data unacknowledged; keepalives:
#: an idle connection's peer silent for 10 + 3 x 5 s) instead of after TCP's ~15 minutes of
#: retransmissions, or never for a connection waiting on an answer. The pool then replaces
#: the connection, and meanwhile the calls fail closed as for any store error. A server that
#: is alive but does not answer (its host still acknowledges) is not detected this way.
TCP_DEFAULTS: dict[str, int] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                                "keepalives_count": 3, "tcp_user_timeout": 30_000}


def _tcp_settings(dsn: str) -> dict[str, int]:
    """``TCP_DEFAULTS`` without what ``dsn`` sets itself (none of them for a DSN libpq cannot
    read: connecting will say what is wrong with it)."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.Error:
        given = {}
    return {k: v for k, v in TCP_DEFAULTS.items() if k not in given}


class PostgresStore(SqlStore):
    """:class:`policy.store.Store` on PostgreSQL, with a connection pool.

    ``connect_timeout`` bounds both opening a connection and waiting for a free one
    from the pool; past it a call fails with ``StoreError``. ``poll_interval`` is how
    often the LISTEN connection checks that it is still alive. ``statement_timeout``
    (seconds; None: none) is PostgreSQL's own bound on each statement of the pooled
    connections, given to those whose session has none from the DSN, the role or the
    database (those win): a server that is alive but does not answer in time (a lock
    held elsewhere, overload) fails the call with a ``StoreError`` naming the timeout
    and the statement is cancelled, its locks and this process's thread freed.
    """

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, pool_size: int = 10,
                 poll_interval: float = 1.0, statement_timeout: float | None = None) -> None:
        super().__init__(f"postgresql store {redact_url(dsn)}")
        if connect_timeout <= 0 or poll_interval <= 0 or pool_size < 1:
            raise ValueError("connect_timeout and poll_interval must be positive, pool_size >= 1")
        if statement_timeout is not None and not 0.001 <= statement_timeout <= 2_000_000:  # PostgreSQL: int ms
            raise ValueError(f"statement_timeout must be 0.001 to 2,000,000 s (or None: none), not {statement_timeout!r}")
        self.statement_timeout = statement_timeout
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self._conn_kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": "rpcauthz",
            **_tcp_settings(dsn),
        }
        self._subscriptions: list[_Listener] = []
        self._closed = False
        self._init_schema()
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, timeout=connect_timeout,
            # autocommit: a read is one statement and one round trip; writes open an
            # explicit transaction in _tx.
            kwargs={**self._conn_kwargs, "row_factory": dict_row, "autocommit": True},
            check=ConnectionPool.check_connection, name="rpcauthz-store", open=True,
            configure=self._bound_statements if statement_timeout is not None else None,
            # psycopg_pool backs off exponentially up to reconnect_timeout between attempts;
            # keep that short so a replica serves again within seconds of PostgreSQL returning.
            reconnect_timeout=10.0)

    def _bound_statements(self, conn: psycopg.Connection[Any]) -> None:
        """A new pooled connection's ``statement_timeout``, unless its session already has
        one (from the DSN's ``options``, ``ALTER ROLE``/``ALTER DATABASE ... SET``)."""
        assert self.statement_timeout is not None
        conn.execute("SELECT set_config('statement_timeout', %s, false) "
                     "WHERE current_setting('statement_timeout') = '0'",
                     (f"{max(1, round(self.statement_timeout * 1000))}ms",))

    def _error(self, e: BaseException) -> StoreError:
        return StoreError(f"{self.label}: {str(e).strip() or type(e).__name__}")

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new, unpooled connection (for LISTEN); raises ``StoreError`` if unreachable."""
        try:
            return psycopg.connect(self.dsn, **{**self._conn_kwargs, **kwargs})
        except psycopg.Error as e:
            raise self._error(e) from e

    def _init_schema(self) -> None:
        with self.connect(row_factory=dict_row) as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(_SCHEMA)
                    query = "SELECT max(version) AS v FROM schema_version"
                    row = _one(conn.execute(query).fetchone(), query)
                    if row["v"] is None or row["v"] < SCHEMA_VERSION:
                        # 1 -> 2 added the grant change log and indexes, 2 -> 3 the spends table,
                        # all created above, and the auditor role:
                        conn.execute(_ROLE_CHECK_V3)
                        conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                                     (SCHEMA_VERSION,))
                    elif row["v"] > SCHEMA_VERSION:
                        raise StoreError(f"{self.label}: schema version {row['v']} is newer than "
                                         f"this program understands ({SCHEMA_VERSION}); upgrade rpcauthz")
            except psycopg.Error as e:
                raise self._error(e) from e

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._tx(write=False) as cur:
            query = "SELECT max(version) AS v FROM schema_version"
            return int(_one(cur.execute(query).fetchone(), query)["v"])

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[psycopg.Cursor[Any]]:
        if self._closed:
            raise StoreError(f"{self.label}: the store is closed")
        try:
            with self._pool.connection() as conn:
                if write:
                    # Commits when the block ends, rolls back if it raises.
                    with conn.transaction(), conn.cursor() as cur:
                        yield cur
                else:
                    with conn.cursor() as cur:
                        yield cur
        except psycopg.Error as e:
            raise self._error(e) from e

    # --- dialect ---------------------------------------------------------------------------
    _INSERT_AUDIT_JSON = (
        f"INSERT INTO audit ({', '.join(codec.AUDIT_COLUMNS)}) SELECT {', '.join(codec.AUDIT_COLUMNS)} "
        "FROM jsonb_to_recordset(%(events)s::jsonb) AS e(id text, kind text, actor text, at timestamptz, "
        "request_id text, service text, method text, outcome text, reason text, detail jsonb, trace_id text) "
        "ON CONFLICT (id) DO NOTHING")

    def _ts(self, dt: datetime) -> datetime:
        return codec.utc(dt)

    def _dt(self, value: datetime) -> datetime:
        return value.astimezone(UTC)

    def _json_in(self, obj: Any) -> Jsonb:
        return Jsonb(obj)

    def _json_out(self, value: Any) -> Any:
        return value

    def _lock_scope(self, cur: Any, key: str) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%(k)s, 0))", {"k": key})

    def _grants_changed(self, cur: Any, delta: GrantDelta) -> None:
        payload = delta.to_json()
        if len(payload.encode()) > MAX_PAYLOAD:
            payload = GrantDelta(delta.since, delta.revision, None).to_json()
        cur.execute("SELECT pg_notify(%(ch)s, %(payload)s)", {"ch": CHANNEL, "payload": payload})

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[psycopg.Cursor[Any]]:
        if self._closed:
            raise StoreError(f"{self.label}: the store is closed")
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield cur
        except psycopg.Error as e:
            raise self._error(e) from e

    # --- change notification ---------------------------------------------------------------
    def watch_grant_deltas(self, on_delta: Callable[[GrantDelta], None]) -> Subscription:
        """LISTEN for grant changes on a dedicated connection; call ``on_delta`` with each
        NOTIFY's delta (its changes, when they fit in the payload).

        The listener reconnects with backoff when the connection drops, and after every
        reconnect reports the current revision (changes not carried) so the caller
        catches up on whatever it missed.
        """
        listener = _Listener(self, on_delta)
        self._subscriptions.append(listener)
        listener.start()
        return listener

    def close(self) -> None:
        """Stop listeners and close the pool; later calls raise ``StoreError``."""
        self._closed = True
        for sub in self._subscriptions:
            sub.close()
        self._pool.close()


class _Listener:
    """A thread holding one autocommit connection that LISTENs on :data:`CHANNEL`."""

    def __init__(self, store: PostgresStore, on_delta: Callable[[GrantDelta], None]) -> None:
        self._store = store
        self._on_delta = on_delta
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-grants-listener", daemon=True)
        self._known: int | None = None

    def start(self) -> None:
        try:
            self._known = self._store.grants_revision()
        except StoreError as e:
            log.warning("grant listener: %s (will retry)", e)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until the LISTEN is in place (tests use this to avoid a race)."""
        return self._connected.wait(timeout)

    def _report(self, delta: GrantDelta) -> None:
        self._known = delta.revision
        try:
            self._on_delta(delta)
        except Exception:  # the callback's failure must not stop the listener
            log.exception("grant listener callback failed")

    def _parse(self, payload: str) -> GrantDelta:
        try:
            return GrantDelta.from_json(payload)
        except ValueError as e:  # not ours to trust: make the receiver read the store
            log.warning("grant listener: %s", e)
            known = self._known or 0
            return GrantDelta(known, known, None)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                conn = self._store.connect(autocommit=True)
            except StoreError as e:
                log.warning("grant listener: %s (retrying in %.1fs)", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    query = "SELECT revision FROM grants_revision WHERE id = 1"
                    revision = _one(conn.execute(query).fetchone(), query)[0]
                    self._connected.set()
                    backoff = 0.2
                    if revision != self._known:  # missed changes while (re)connecting
                        since = self._known if self._known is not None and self._known <= revision \
                            else int(revision)
                        self._report(GrantDelta(since, int(revision), None))
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._store.poll_interval):
                            self._report(self._parse(note.payload))
                        conn.execute("SELECT 1")  # notice a dead server even when idle
            except psycopg.Error as e:
                if self._stop.is_set():
                    return
                log.warning("grant listener lost its connection: %s (reconnecting)", e)
                self._known = None  # force a refresh once reconnected
            finally:
                self._connected.clear()
                with contextlib.suppress(Exception):
                    conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._store.poll_interval + 5)
