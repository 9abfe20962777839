"""CI installs at the versions of .ci/constraints.txt, each inside pyproject's ranges.

A release inside a range used to reach CI unannounced (Typer 0.29 changed its shell detection
between two stops and a CLI test failed on a clean clone). .ci/lock.py pins what a green
environment had; these tests keep the pins, pyproject and .ci/run in step."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from types import ModuleType

import pytest
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_lock", ROOT / ".ci" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not a name==version pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_requirement_of_pyproject_is_pinned_inside_its_range():
    lock = _lock()
    pins = _pins((ROOT / ".ci" / "constraints.txt").read_text())
    for req in lock.project_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} has no pin in .ci/constraints.txt: run python .ci/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f".ci/constraints.txt pins {name}=={pins[name]}, outside pyproject's {req}: "
            "reinstall within the range, run the tests, then python .ci/lock.py")


def test_ci_installs_with_the_constraints():
    run = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in run.splitlines() if "pip install" in line and "-e '.[test]'" in line]
    assert installs and all("-c .ci/constraints.txt" in line for line in installs), installs


@pytest.mark.skipif(os.environ.get("CI") != "true",
                    reason="compares the installed environment with the lock only where .ci/run installed it (CI=true)")
def test_the_lock_is_exactly_what_ci_installed():
    lock = _lock()
    installed = lock.closure(lock.project_requirements())
    pinned = _pins((ROOT / ".ci" / "constraints.txt").read_text())
    missing = sorted(set(installed) - set(pinned))
    extra = sorted(set(pinned) - set(installed))
    differ = sorted(f"{n} {pinned[n]} pinned, {installed[n]} installed"
                    for n in set(installed) & set(pinned) if installed[n] != pinned[n])
    assert not (missing or extra or differ), (
        f"the lock is stale (python .ci/lock.py): needed but not pinned {missing}, "
        f"pinned but not needed {extra}, versions {differ}")


def test_the_closure_follows_extras_and_markers_and_names_what_is_missing(tmp_path):
    lock = _lock()
    from packaging.requirements import Requirement

    # psycopg[binary] needs psycopg-binary only through its extra; pytest needs no colorama here.
    pins = lock.closure([Requirement("psycopg[binary]"), Requirement("pytest")])
    assert "psycopg-binary" in pins and "pytest" in pins and "pluggy" in pins
    if sys.platform != "win32":
        assert "colorama" not in pins
    assert "psycopg-binary" not in lock.closure([Requirement("psycopg")])
    with pytest.raises(LookupError, match="no-such-dist-rpcauthz is required but not installed"):
        lock.closure([Requirement("no-such-dist-rpcauthz")])
    rendered = lock.render({"b": "2", "a": "1.0"})
    assert rendered.endswith("a==1.0\nb==2\n") and rendered.startswith("# Generated")
