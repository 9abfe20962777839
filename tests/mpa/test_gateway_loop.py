"""The approval loop through real Envoy with the ``mpa`` CLI only, following the very commands
``devstack.demo_approvals.demo_steps`` prints for ``mpactl demo``."""
from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.envoy]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_steps_run_the_loop_through_envoy(tmp_path):
    import grpc

    from devstack.demo_approvals import demo_steps
    from tests.support.gateway_harness import READ_ACCOUNT as rpc
    from tests.support.gateway_harness import gateway_with_approvals

    with gateway_with_approvals(tmp_path) as (gw, approvals, base):
        steps = demo_steps(base, requester="erin", approver="alice", rpc=rpc, call_cmd="CALL",
                           config_root=str(tmp_path / "people"))
        calls = []
        for what, command in steps:
            if command == "CALL":
                calls.append(gw.call(rpc, as_="erin"))
                continue
            words = shlex.split(command)
            env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
            while "=" in words[0]:
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            assert words[0] == "mpa"
            res = subprocess.run([sys.executable, "-m", "mpa.cli", *words[1:]], cwd=ROOT, env=env,
                                 input="a\n\n" if words[1] == "review" else None,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, (what, res.stdout, res.stderr)
            if words[1] == "list":
                assert "approved" in res.stdout and "alice" in res.stdout
        first, last = calls
        assert first.code is grpc.StatusCode.PERMISSION_DENIED and first.request_url.startswith(base)
        assert last.code is grpc.StatusCode.OK, last.message
        request_id = first.request_url.rsplit("/", 1)[1]
        r = approvals.store.get_request(request_id)
        assert r.approvers == ("alice",) and r.reason.startswith("customer ticket 4411")
