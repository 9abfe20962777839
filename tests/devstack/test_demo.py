"""`mpactl demo` on this machine: start it, run the commands it prints, stop it."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import httpx
import pytest

from devstack.processes import REPO_ROOT

pytestmark = [pytest.mark.envoy]
MPACTL = [sys.executable, "-m", "mpactl.app"]


def run_printed(command: str, request_id: str | None = None) -> subprocess.CompletedProcess:
    argv = shlex.split(command.replace("REQUEST_ID", request_id or "REQUEST_ID"))
    assert argv[0] == "mpactl"
    return subprocess.run(MPACTL + argv[1:], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def run_loop_step(command: str, tmp_path) -> subprocess.CompletedProcess:
    """Run one printed loop line: `mpactl ...`, or `MPA_CONFIG_DIR=... mpa ...` (sessions kept
    under tmp_path instead of the printed /tmp folder)."""
    words = shlex.split(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = str(tmp_path / "people" / pathlib.Path(value).name) if key == "MPA_CONFIG_DIR" else value
    if words[0] == "mpactl":
        argv = MPACTL + words[1:]
    else:
        assert words[0] == "mpa", command
        argv = [sys.executable, "-m", "mpa.cli", *words[1:]]
    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
                         input="a\n\n" if words[1:2] == ["review"] else None)
    if words[0] == "mpa":
        assert res.returncode == 0, (command, res.stdout, res.stderr)
    return res


def run_aws_step(command: str, tmp_path, request_id: str = "") -> subprocess.CompletedProcess:
    """Run one printed broker line: `VAR=... mpa ...` or `VAR=... python -c ...`."""
    words = shlex.split(command.replace("REQUEST_ID", request_id or "REQUEST_ID"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPA_", "AWS_"))}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = str(tmp_path / "people" / pathlib.Path(value).name) if key == "MPA_CONFIG_DIR" else value
    argv = [sys.executable, "-m", "mpa.cli", *words[1:]] if words[0] == "mpa" else words
    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (command, res.stdout, res.stderr)
    return res


def dev_auth(approvals_url: str, who: str) -> dict[str, str]:
    token = httpx.post(f"{approvals_url}/api/dev/token", json={"subject": who}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def assert_in_inbox(approvals_url: str, who: str, table: str, href: str) -> None:
    """``who``'s inbox at ``/`` links ``href`` from its ``table`` (waiting or mine)."""
    inbox = httpx.get(f"{approvals_url}/", headers=dev_auth(approvals_url, who))
    assert inbox.status_code == 200, inbox.text
    m = re.search(rf'<table id="{table}">(.*?)</table>', inbox.text, re.S)
    assert m and f'href="{href}"' in m.group(1), inbox.text


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
        ordered = []  # every printed walk-through command, in the order printed
        kind = None
        for ln in lines:
            m = re.match(r"\s+# \[(\w+)\]", ln)
            if m:
                kind = m.group(1)
            elif ln.strip().startswith("mpactl ") and kind in ("allow", "deny", "approval", "approve"):
                ordered.append((kind, ln.strip()))
        request_id = None
        seen_self_approval_check = False
        for kind, command in ordered:
            res = run_printed(command, request_id)
            said = res.stdout + res.stderr
            if kind == "allow":
                assert res.returncode == 0 and "status: OK" in res.stdout, (command, said)
            elif kind == "deny":
                assert res.returncode == 1 and "PERMISSION_DENIED" in res.stdout, (command, said)
                assert "x-mpa-request-url" not in res.stdout
                if "UpdateLimits" in command:
                    assert "not a contributor" in res.stdout
                    as_json = run_printed(command + " --json")
                    assert as_json.returncode == 1, as_json.stderr
                    denied = json.loads(as_json.stdout)
                    assert set(denied) == {"status", "code", "message", "request_url", "replies"}
                    assert (denied["status"], denied["code"], denied["request_url"]) == ("PERMISSION_DENIED", 7, None)
                    assert "not a contributor" in denied["message"]
            elif kind == "approval":
                assert res.returncode == 1 and "approval required" in res.stdout, (command, said)
                url = re.search(r"^x-mpa-request-url: (\S+)$", res.stdout, re.M).group(1)
                request_id = url.rsplit("/", 1)[1]
                assert "Nobody can approve" not in res.stdout, "the demo data leaves nobody to approve"
                if not seen_self_approval_check:
                    # A refused `demo approve` (the requester approving themselves) changes
                    # nothing: the request still waits for its requester's reason.
                    requester = re.search(r"--as (\w+)", command).group(1)
                    selfie = run_printed(f"mpactl demo approve --dir {tmp_path / 'demo'} --as "
                                         f"{requester} REQUEST_ID", request_id)
                    assert selfie.returncode == 1 and "own request" in selfie.stderr, selfie.stderr
                    from policy.stores import open_store
                    store = open_store(f"sqlite:///{tmp_path / 'demo' / 'rpcauthz.db'}")
                    try:
                        assert store.get_request(request_id).reason == ""
                    finally:
                        store.close()
                    seen_self_approval_check = True
            else:
                assert res.returncode == 0 and "approved" in res.stdout, (command, said)
        assert sum(k == "approve" for k, _ in ordered) == 2

        # The printed approval loop with the `mpa` CLI against the demo's approvals service.
        loop = [ln.strip() for i, ln in enumerate(lines) if i and "# [loop]" in lines[i - 1]]
        assert loop, "the demo prints the mpa approval loop"
        outputs = [run_loop_step(command, tmp_path) for command in loop]
        first_call, last_call = outputs[0], outputs[-1]
        assert first_call.returncode == 1 and "approval required" in first_call.stdout
        approvals_url = re.search(r"approvals \(page, API for `mpa`\): (\S+)", "\n".join(lines)).group(1)
        assert f"x-mpa-request-url: {approvals_url}/requests/" in first_call.stdout
        assert last_call.returncode == 0 and "status: OK" in last_call.stdout, last_call.stdout

        # The credential broker on the local AWS: request, approval, then real SDK calls.
        aws_steps = [ln.strip() for i, ln in enumerate(lines) if i and "# [aws]" in lines[i - 1]]
        assert len(aws_steps) == 4, "\n".join(lines)
        requested = run_aws_step(aws_steps[0], tmp_path)
        request_id = requested.stdout.split()[0]
        assert request_id.startswith("cr-")
        # The demo's web inbox lists it, linked to its page: waiting for alice, among bob's own.
        assert_in_inbox(approvals_url, "alice", "waiting", f"/credentials/{request_id}")
        assert_in_inbox(approvals_url, "bob", "mine", f"/credentials/{request_id}")
        page = httpx.get(f"{approvals_url}/credentials/{request_id}", headers=dev_auth(approvals_url, "alice"))
        assert page.status_code == 200 and 'id="approve"' in page.text and "AWS role platform-admin" in page.text
        run_aws_step(aws_steps[1], tmp_path, request_id)
        sdk = run_aws_step(aws_steps[2], tmp_path)
        assert ":assumed-role/platform-admin/" in sdk.stdout and "nat-gateway.log" in sdk.stdout
        trail = pathlib.Path(shlex.split(aws_steps[3])[1]).read_text()
        assert '"source_identity": "bob"' in trail and '"mpa:approver": "alice"' in trail
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


@pytest.mark.parametrize("path, words", [
    ("/rpcauthz.demo.v1.Nope/X",
     "unknown service 'rpcauthz.demo.v1.Nope'; known: rpcauthz.demo.v1.Accounts, rpcauthz.demo.v1.Ledger"),
    ("/rpcauthz.demo.v1.Accounts/NoSuch", "rpcauthz.demo.v1.Accounts has no method 'NoSuch'; it has CloseAccount"),
    ("garbage", "'garbage' is not /package.Service/Method, e.g. /rpcauthz.demo.v1.Accounts/..."),
])
def test_demo_call_names_the_services_and_methods_it_can_call(path, words):
    """A mistyped path is refused before anything is sent, naming what exists (it once
    listed the generated modules' names instead of the services)."""
    from devstack import democlient
    with pytest.raises(ValueError) as e:
        democlient.call("127.0.0.1:1", path, token=None)
    assert words in str(e.value)
