"""`mpactl reflect` (run as python -m reflection_cache.cli) against a real demo server."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from devstack.demo_services import start_demo_server

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reflection_cache.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def demo():
    handle = start_demo_server(reflection=("v1alpha",))
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def test_table_shows_declared_and_applied_modes(demo):
    out = run("rpcauthz.demo.v1.Ledger", "--endpoint", demo.address)
    assert out.returncode == 0, out.stderr
    assert "(reflection v1alpha)" in out.stdout
    assert "service default: CONTRIBUTORS_WITH_APPROVAL" in out.stdout
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[3:]}
    assert lines["GetBalance"] == ["ENGINEERS_WITHOUT_APPROVAL", "ENGINEERS_WITHOUT_APPROVAL", "method"]
    assert lines["PostEntry"] == ["-", "CONTRIBUTORS_WITH_APPROVAL", "service"]


def test_json_and_configured_default(demo):
    out = run("rpcauthz.demo.v1.Accounts", "--endpoint", demo.address, "--json",
              "--default-mode", "engineers_with_approval")
    assert out.returncode == 0, out.stderr
    rows = {r["method"]: r for r in json.loads(out.stdout)["methods"]}
    assert rows["Ping"] == {"method": "Ping", "declared": "-", "applies": "ENGINEERS_WITH_APPROVAL",
                            "from": "default"}
    assert rows["EraseCustomerData"]["applies"] == "BREAK_GLASS_ONLY"


def test_errors_exit_with_the_reason(demo, port):
    out = run("rpcauthz.demo.v1.Nope", "--endpoint", demo.address)
    assert (out.returncode, out.stdout) == (2, "")
    assert "error: unknown_service:" in out.stderr and "rpcauthz.demo.v1.Nope" in out.stderr
    out = run("rpcauthz.demo.v1.Ledger", "--endpoint", f"127.0.0.1:{port}")
    assert out.returncode == 4 and "error: reflection_unavailable:" in out.stderr  # unreachable
    out = run("rpcauthz.demo.v1.Ledger")
    assert out.returncode == 2 and "no reflection endpoint is configured" in out.stderr
    out = run("rpcauthz.demo.v1.Ledger", "--endpoint", demo.address, "--default-mode", "everyone")
    assert out.returncode == 2 and "unknown humans_who_can_rpc mode 'everyone'" in out.stderr
