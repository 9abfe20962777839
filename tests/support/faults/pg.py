"""PostgreSQL for the fault scenarios: a fresh database, and a DSN through a ``TcpProxy``."""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from devstack.processes import free_port
from tests.support.store_tcp_proxy import TcpProxy


@contextlib.contextmanager
def fresh_database(server_dsn: str) -> Iterator[str]:
    """A new empty database on the server of ``server_dsn``, dropped afterwards."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"rpcauthz_fault_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(**{**conninfo_to_dict(server_dsn), "dbname": name})
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def relayed(dsn: str) -> Iterator[tuple[TcpProxy, str]]:
    """A started relay in front of ``dsn``'s server and the DSN that goes through it. The
    machine's PostgreSQL is never stopped: the relay is cut, hung and restored instead."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    proxy = TcpProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432), free_port())
    proxy.start()
    try:
        yield proxy, make_conninfo(**{**params, "host": "127.0.0.1", "port": str(proxy.port),
                                      "connect_timeout": "2"})
    finally:
        proxy.resume()
        proxy.stop()
