"""`mpactl demo` on this machine: start it, run the commands it prints, stop it."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from extauthz.processes import REPO_ROOT

pytestmark = [pytest.mark.envoy]
MPACTL = [sys.executable, "-m", "rpcauthz.mpactl"]


def run_printed(command: str, request_id: str | None = None) -> subprocess.CompletedProcess:
    argv = shlex.split(command.replace("REQUEST_ID", request_id or "REQUEST_ID"))
    assert argv[0] == "mpactl"
    return subprocess.run(MPACTL + argv[1:], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def test_demo_prints_commands_that_show_allow_deny_and_approval(tmp_path):
    demo = subprocess.Popen(MPACTL + ["demo", "--dir", str(tmp_path / "demo")], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                break
        assert lines and lines[-1] == "ready", "\n".join(lines)
        commands: dict[str, list[str]] = {}
        kind = None
        for ln in lines:
            m = re.match(r"\s+# \[(\w+)\]", ln)
            if m:
                kind = m.group(1)
            elif ln.strip().startswith("mpactl ") and kind:
                commands.setdefault(kind, []).append(ln.strip())

        allow = run_printed(commands["allow"][0])
        assert allow.returncode == 0 and "status: OK" in allow.stdout, allow.stdout + allow.stderr

        deny = run_printed(commands["deny"][0])
        assert deny.returncode == 1 and "PERMISSION_DENIED" in deny.stdout
        assert "not a contributor" in deny.stdout and "x-mpa-request-url" not in deny.stdout

        approval_cmd = commands["approval"][0]
        needs = run_printed(approval_cmd)
        assert needs.returncode == 1 and "approval required" in needs.stdout
        url = re.search(r"^x-mpa-request-url: (\S+)$", needs.stdout, re.M).group(1)
        request_id = url.rsplit("/", 1)[1]

        approved = run_printed(commands["approve"][0], request_id)
        assert approved.returncode == 0 and "approved" in approved.stdout, approved.stdout + approved.stderr
        again = run_printed(approval_cmd)
        assert again.returncode == 0 and "status: OK" in again.stdout, again.stdout
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            out, _ = demo.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert demo.returncode == 0, out
    assert "stopping" in out
    # Everything it started is gone: nothing answers on the gateway port any more.
    port = int(re.search(r"gateway \(Envoy\):\s+127\.0\.0\.1:(\d+)", "\n".join(lines)).group(1))
    import socket
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
