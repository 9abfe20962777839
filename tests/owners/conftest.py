"""Fixtures for the service-owner tools."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.owners_support import copy_googleapis


@pytest.fixture
def gtree(tmp_path: Path) -> Path:
    """A copy of googleapis-common-protos' .proto tree in ``tmp_path/tree``."""
    return copy_googleapis(tmp_path)
