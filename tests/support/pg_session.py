"""What a PostgreSQL store's pooled sessions were given."""
from __future__ import annotations

from typing import Any


def statement_timeout_of(store: Any) -> str:
    """``SHOW statement_timeout`` on one of ``store``'s pooled connections (``0``: none)."""
    with store._pool.connection() as conn:  # noqa: SLF001 - the sessions the calls run on
        return conn.execute("SHOW statement_timeout").fetchone()["statement_timeout"]
