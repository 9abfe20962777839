"""Fixtures shared by every test folder: free ports and a throwaway PostgreSQL database."""
from __future__ import annotations

import os
import uuid

import pytest

from devstack.processes import free_port  # one free-port helper; tests import it from here

__all__ = ["free_port"]

PG_ENV = "RPCAUTHZ_TEST_PG_DSN"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session", autouse=True)
def _session_state_dir(tmp_path_factory):
    """Servers that module-scoped fixtures start (before the per-test directory below is set)
    keep their state out of the checkout too; under pytest-xdist each worker has its own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RPCAUTHZ_STATE_DIR", str(tmp_path_factory.mktemp("session-state")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory, monkeypatch) -> None:
    """Each test's servers keep their state (the audit spool, on by default) in a directory
    of their own, never in the checkout shared with other tests."""
    monkeypatch.setenv("RPCAUTHZ_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def port() -> int:
    return free_port()


def _pg_admin_dsn() -> str | None:
    dsn = os.environ.get(PG_ENV)
    if dsn:
        return dsn
    return DEFAULT_PG_DSN if os.environ.get("CI") == "true" else None


@pytest.fixture(scope="session")
def pg_server_dsn() -> str:
    """DSN of the PostgreSQL server to test against (from $RPCAUTHZ_TEST_PG_DSN).

    Where CI=true the tests must run: an unreachable server is a failure, not a skip.
    """
    import psycopg

    dsn = _pg_admin_dsn()
    if dsn is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. {DEFAULT_PG_DSN})")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and PostgreSQL at {dsn} is unreachable: {e}")
        pytest.skip(f"PostgreSQL at {dsn} is unreachable: {e}")
    return dsn


@pytest.fixture
def pg_dsn(pg_server_dsn: str):
    """A fresh, empty database for one test, dropped afterwards."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"rpcauthz_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(pg_server_dsn)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def reflection_pki(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    from tests.support.reflection_tls import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_reflection_server(reflection_pki):
    """A reflection server for shop.orders.v1.Orders that demands a client certificate."""
    from tests.support.reflection_tls import mtls_orders_server
    with mtls_orders_server(reflection_pki) as srv:
        yield srv
