"""Migrate a real public proto, serve it for real, and read the chosen modes back through reflection."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from policy import Mode
from reflection_cache.client import ReflectionClient
from tests.support.owners_support import DescriptorServer, descriptor_set_with_system_protoc, run_mpactl

OPS = "google/longrunning/operations_proto.proto"
SVC = "google.longrunning.Operations"


def test_migrated_modes_reach_the_gateway_reader_and_lint_reflect(gtree: Path, tmp_path: Path):
    res = run_mpactl("migrate", SVC, "--root", str(gtree), "--yes",
                     "--set", "ListOperations=ENGINEERS_WITHOUT_APPROVAL",
                     "--set", "DeleteOperation=BREAK_GLASS_ONLY",
                     "--set", "WaitOperation=ENGINEERS_WITH_APPROVAL")
    assert res.returncode == 0, res.stderr
    fds = descriptor_set_with_system_protoc(gtree, [OPS], tmp_path / "ops.pb")
    with DescriptorServer(fds, [SVC]) as server:
        async def fetch():
            client = ReflectionClient(deadline=5)
            try:
                return await client.fetch(SVC, server.address)
            finally:
                await client.close()
        modes = asyncio.run(fetch())
        assert dict(modes.methods) == {
            "ListOperations": Mode.ENGINEERS_WITHOUT_APPROVAL,
            "GetOperation": Mode.CONTRIBUTORS_WITHOUT_APPROVAL,   # --yes took the suggestion
            "DeleteOperation": Mode.BREAK_GLASS_ONLY,
            "CancelOperation": Mode.CONTRIBUTORS_WITH_APPROVAL,
            "WaitOperation": Mode.ENGINEERS_WITH_APPROVAL,
        }
        assert modes.service_default is None
        lint = run_mpactl("lint", "--reflect", server.address)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert "ok: all 5 RPCs declare humans_who_can_rpc" in lint.stdout


def test_lint_reflect_reports_undeclared_rpcs_of_a_live_service(gtree: Path, tmp_path: Path):
    fds = descriptor_set_with_system_protoc(gtree, [OPS, "google/cloud/location/locations.proto"],
                                            tmp_path / "raw.pb")
    with DescriptorServer(fds, [SVC, "google.cloud.location.Locations"]) as server:
        res = run_mpactl("lint", "--reflect", server.address, "--format", "json")
        assert res.returncode == 1, res.stdout + res.stderr
        data = json.loads(res.stdout)
        got = {(f["service"], f["method"]) for f in data["findings"]}
        assert len(got) == 7 and (SVC, "GetOperation") in got
        assert all(f["file"] == server.address for f in data["findings"])
        res = run_mpactl("lint", "--reflect", server.address, "--service", "google.cloud.location.Locations")
        assert res.returncode == 1
        assert res.stdout.count(": error: ") == 2
        res = run_mpactl("lint", "--reflect", server.address, "--service", "no.such.Service")
        assert res.returncode == 2 and "no.such.Service" in res.stderr


def test_lint_reflect_unreachable_is_an_error(port: int):
    res = run_mpactl("lint", "--reflect", f"127.0.0.1:{port}")
    assert res.returncode == 4  # unreachable (README.md, "Exit codes")
    assert f"127.0.0.1:{port}" in res.stderr
