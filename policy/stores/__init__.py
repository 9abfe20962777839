"""Store adapters (SQLite, PostgreSQL) behind :class:`policy.store.Store`, and ``open_store``.

Store URLs:

- ``sqlite:///var/lib/rpcauthz/store.db`` - a SQLite file at the absolute path
  ``/var/lib/rpcauthz/store.db`` (``sqlite:////abs/path`` works too);
- ``sqlite:///:memory:`` - a private in-memory database, gone when the store closes;
- ``postgresql://user:password@host:5432/dbname?sslmode=...`` (or ``postgres://``) - any
  libpq connection URI. A libpq key=value string (``host=db dbname=rpcauthz user=gw``) is
  accepted as well, since that is what psycopg's ``make_conninfo`` produces.

Options common to every URL are keyword arguments: ``poll_interval`` (SQLite: seconds
between grant-revision polls, default 0.25), ``busy_timeout`` (SQLite), ``connect_timeout``,
``pool_size`` and ``statement_timeout`` (PostgreSQL; see ``PostgresStore``).
"""
from __future__ import annotations

from typing import Any

from ..store import Store
from ._sql import plan_replace

__all__ = ["open_store", "plan_replace", "redact_url"]

_OPTIONS = frozenset({"poll_interval", "busy_timeout", "connect_timeout", "pool_size", "statement_timeout"})


def open_store(url: str, **options: Any) -> Store:
    """Open (creating the schema if needed) the store named by ``url``.

    Raises ``ValueError`` for a URL this function does not understand and
    ``policy.StoreError`` naming the store and the cause if it cannot be reached.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a store URL is required, e.g. sqlite:///var/lib/rpcauthz/store.db "
                         "or postgresql://user@host/db")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown store option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_OPTIONS))}")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore
        return SQLiteStore(_sqlite_path(url), **_pick(options, "poll_interval", "busy_timeout"))
    if scheme in ("postgresql", "postgres") or _is_conninfo(url):
        from .postgres import PostgresStore
        return PostgresStore(url, **_pick(options, "poll_interval", "connect_timeout", "pool_size",
                                                  "statement_timeout"))
    raise ValueError(f"unsupported store URL {redact_url(url)!r}: use sqlite:///ABSOLUTE/PATH.db, "
                     "sqlite:///:memory: or postgresql://user@host:port/dbname")


def _sqlite_path(url: str) -> str:
    if not url.lower().startswith("sqlite://"):
        raise ValueError(f"malformed SQLite store URL {url!r}: expected sqlite:///ABSOLUTE/PATH.db")
    rest = url[len("sqlite://"):]
    if "?" in rest or "#" in rest:
        raise ValueError(f"SQLite store URL {url!r} takes no query string; pass options separately")
    if rest in ("/:memory:", ":memory:"):
        return ":memory:"
    if not rest.startswith("/") or rest == "/":
        raise ValueError(f"SQLite store URL {url!r} needs an absolute path: sqlite:///ABSOLUTE/PATH.db")
    while rest.startswith("//"):
        rest = rest[1:]
    return rest


def _is_conninfo(text: str) -> bool:
    """A libpq ``key=value ...`` string naming at least a database or host."""
    import re
    if "://" in text:
        return False
    keys = re.findall(r"(?:^|\s)(\w+)\s*=", text)
    return bool(keys) and {"dbname", "host", "hostaddr", "service"} & set(keys) != set()


def _pick(options: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """Options meant for this adapter; ``None`` means "use the default"."""
    return {k: v for k, v in options.items() if k in allowed and v is not None}


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    import re
    url = re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)
