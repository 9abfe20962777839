"""Fixtures for the store tests: one parametrised ``backend`` that opens either store."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from policy.stores import open_store


@dataclasses.dataclass
class Backend:
    """How to open (and reopen) one store for a test."""

    name: str
    url: str
    opened: list[Any] = dataclasses.field(default_factory=list)

    def open(self, **options: Any):
        store = open_store(self.url, **options)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            try:
                store.close()
            except Exception:
                pass


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite://{tmp_path}/store.db")
    else:
        b = Backend("postgresql", request.getfixturevalue("pg_dsn"))
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture
def store(backend: Backend):
    return backend.open(poll_interval=0.2)


OpenStore = Callable[..., Any]
