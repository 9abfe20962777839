"""The store keeps a body-bound request's view for approvers (SQLite and PostgreSQL)."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    from policy.stores import open_store
    url = (f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_dsn"))
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


def test_first_view_wins_and_unknown_is_none(store):
    assert store.get_body_view("r1") is None
    store.put_body_view("r1", 'demo.M {"a": 1}')
    store.put_body_view("r1", "something else")
    assert store.get_body_view("r1") == 'demo.M {"a": 1}'
