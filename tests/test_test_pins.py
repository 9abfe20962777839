"""The test tools run here are the ones pyproject's ``test`` extra pins (issue 9, finding 6: a
fresh install resolved schemathesis 4.32 with pytest 9.2, and tests/mpa/test_openapi.py broke)."""
from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
PINNED = ("pytest", "schemathesis", "pytest-xdist")


@pytest.mark.parametrize("name", PINNED)
def test_installed_test_tools_match_the_pins(name):
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    (req,) = [Requirement(r) for r in extra if Requirement(r).name == name]
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed), (
        f"{name} {installed} is installed but pyproject pins {req}: reinstall with pip install -e '.[test]'")
    # A pin, not an open range: both ends bounded to one minor release.
    assert any(s.operator == "<" for s in req.specifier) and any(s.operator == ">=" for s in req.specifier)
