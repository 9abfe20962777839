"""A non-editable install carries what `mpactl demo` needs outside the Python packages."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_envoy_configs_protos_and_console_scripts(tmp_path):
    # setuptools builds in the source tree (build/, *.egg-info): build a copy, not the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "artifacts", "*.db*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("rpcauthz-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    shipped = {f"share/rpcauthz/envoy/{p.name}" for p in (ROOT / "envoy").glob("*.yaml")}
    assert "share/rpcauthz/envoy/gateway.yaml" in shipped
    assert shipped | {"share/rpcauthz/proto/rpcauthz/v1/options.proto"} <= data
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "mpa = mpa.cli:main" in entry_points and "mpactl = mpactl.app:main" in entry_points
    for pkg in ("policy", "reflection_cache", "extauthz", "mpa", "enclave_bridge", "rpcauthz"):
        assert f"{pkg}/__init__.py" in names
    assert "mpa/templates/" in "".join(names), "the approval page's templates are package data"
