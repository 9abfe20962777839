"""Helpers for the service-owner tool tests: a real public proto tree, CLI runners."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # tests/support/x.py -> repo root


def googleapis_root() -> Path:
    """Where googleapis-common-protos installed its google/**/*.proto files."""
    spec = importlib.util.find_spec("google.longrunning")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("googleapis-common-protos is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0]).parent.parent  # .../site-packages


def copy_googleapis(tmp_path: Path) -> Path:
    """A copy of googleapis-common-protos' .proto files (google/api, longrunning, rpc, ...).

    google/protobuf/*.proto are left out on purpose: the tools must find the well-known
    types themselves, as they would for a service repository.
    """
    src = googleapis_root()
    root = tmp_path / "tree"
    for f in (src / "google").rglob("*.proto"):
        rel = f.relative_to(src)
        if rel.parts[1] == "protobuf":
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / rel)
    assert (root / "google/longrunning/operations_proto.proto").is_file()
    return root


def run_mpactl(*args: str, cwd: Path = REPO, input: str | None = None,
               env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this worktree's ``mpactl`` as a user would (a subprocess)."""
    full_env = {**os.environ, **(env or {})}
    if "RPCAUTHZ_STORE_URL" not in (env or {}):
        full_env.pop("RPCAUTHZ_STORE_URL", None)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "rpcauthz.mpactl", *args], cwd=cwd,
                          capture_output=True, text=True, input=input, timeout=timeout,
                          env=full_env)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
