"""The dependency arrows README's "Layout" section draws, checked against every import.

Every ``import`` and ``from ... import`` in the project's packages (module level or inside a
function) is parsed; an import from one top-level package into another must follow an arrow
of ``ALLOWED`` and must not name a private (``_x``) module or attribute. Generated protobuf
code (``*_pb2``, ``*_pb2_grpc``) is the wire format and may be imported from anywhere.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: package -> the packages it may import. Keep in step with README.md ("Layout").
ALLOWED: dict[str, set[str]] = {
    "rpcauthz": set(),
    "policy": {"rpcauthz"},
    "reflection_cache": {"policy", "rpcauthz"},
    "fastpath": {"reflection_cache", "policy", "rpcauthz"},
    "extauthz": {"fastpath", "reflection_cache", "policy", "rpcauthz"},
    "enclave_bridge": {"policy", "rpcauthz"},
    "mpa": {"enclave_bridge", "reflection_cache", "policy", "rpcauthz"},
    "owners": {"extauthz", "fastpath", "reflection_cache", "policy", "rpcauthz"},
    "devstack": {"mpa", "owners", "extauthz", "fastpath", "enclave_bridge", "reflection_cache",
                 "policy", "rpcauthz"},
    "mpactl": {"devstack", "mpa", "owners", "extauthz", "fastpath", "enclave_bridge",
               "reflection_cache", "policy", "rpcauthz"},
}
PACKAGES = set(ALLOWED)


def _generated(module: str) -> bool:
    return module.rsplit(".", 1)[-1].endswith(("_pb2", "_pb2_grpc"))


def _imports(path: pathlib.Path, root: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package_parts = list(path.relative_to(root).with_suffix("").parts)
    if package_parts[-1] == "__init__":
        package_parts.pop()
    else:
        package_parts = package_parts[:-1]
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, [a.name for a in node.names]))
    return found


def _sources(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
                  if not _generated(p.stem))


def _violations(root: pathlib.Path = ROOT) -> list[str]:
    bad: list[str] = []
    for path in _sources(root):
        here = path.relative_to(root).parts[0]
        for line, module, names in _imports(path, root):
            top = module.split(".")[0]
            if top not in PACKAGES or top == here or _generated(module):
                continue
            if names and all(_generated(n) for n in names):
                continue
            where = f"{path.relative_to(root)}:{line}"
            if top not in ALLOWED[here]:
                bad.append(f"{where}: {here} -> {top} ({module}) is not an arrow README draws")
            private = [p for p in module.split(".")[1:] if p.startswith("_") and p != "__init__"]
            private += [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{where}: private {', '.join(private)} of {top} used from {here}")
    return bad


#: Arrows being removed; each entry names the change that removes it. Keep this empty.
PENDING: set[str] = set()


def test_imports_follow_the_arrows_readme_draws() -> None:
    assert [v for v in _violations() if not any(p in v for p in PENDING)] == []


def test_readme_draws_the_same_arrows() -> None:
    """README's layout section lists each package's allowed imports in a ``deps`` line."""
    text = (ROOT / "README.md").read_text()
    drawn: dict[str, set[str]] = {}
    for m in re.finditer(r"^- `(\w+)` → (.*)$", text, re.M):
        targets = {t.strip(" `") for t in m.group(2).split(",")} - {"nothing", ""}
        drawn[m.group(1)] = targets
    assert drawn == ALLOWED


def test_every_top_level_package_is_a_box() -> None:
    # build/ (left by `pip wheel .` in tests/test_packaging.py) and dist/ are not source.
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"build", "dist"}
    assert on_disk == PACKAGES, "a new top-level package needs a box and arrows in README"


#: Packages whose code is exercised through the other packages' tests.
UNMIRRORED = {"mpactl", "rpcauthz"}


@pytest.mark.parametrize("package", sorted(PACKAGES - UNMIRRORED))
def test_tests_mirror_the_packages(package: str) -> None:
    assert (ROOT / "tests" / package).is_dir(), f"tests/{package}/ is missing"


def test_the_check_catches_a_wrong_arrow(tmp_path: pathlib.Path) -> None:
    """A policy module importing extauthz, or a private name across packages, is reported."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "policy" / "bad.py").write_text("def f():\n    from extauthz import server\n")
    (tmp_path / "mpa" / "worse.py").write_text("from policy.stores._sql import plan\n")
    (tmp_path / "mpa" / "fine.py").write_text("from . import api\nfrom policy import decide\n")
    found = _violations(tmp_path)
    assert len(found) == 2, found
    assert any("policy -> extauthz" in v for v in found)
    assert any("private _sql of policy used from mpa" in v for v in found)
