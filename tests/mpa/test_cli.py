"""The whole approval loop with the ``mpa`` CLI only: real subprocesses, real server, real store."""
from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

import policy
from policy import Mode, Target
from tests.support.approvals_env import LEDGER, approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"


@pytest.fixture
def env(tmp_path):
    with approvals_env(tmp_path) as e:
        yield e


def mpa(home: pathlib.Path, *args: str, input: str | None = None, env_extra: dict | None = None
        ) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("MPA_SERVER", "MPA_TOKEN")}
    environ.update({"MPA_CONFIG_DIR": str(home), "COLUMNS": "200", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "mpa.cli", *args], cwd=ROOT, env=environ,
                          input=input, capture_output=True, text=True, timeout=60)


def login(env, tmp_path, who: str) -> pathlib.Path:
    home = tmp_path / who.split("@")[0]
    res = mpa(home, "login", "--server", env.url, "--as", who)
    assert res.returncode == 0, res.stderr
    assert f"signed in to {env.url} as {who}" in res.stdout
    session = home / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    return home


def test_request_review_approve_loop_with_the_cli_only(env, tmp_path):
    alice, bob = login(env, tmp_path, A), login(env, tmp_path, B)

    made = mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "--reason", "refund for ticket 4411",
               "--duration", "30m", "--json")
    assert made.returncode == 0, made.stderr
    r = json.loads(made.stdout)
    rid = r["id"]
    assert r["state"] == "pending" and r["approval_ttl_seconds"] == 1800

    human = mpa(alice, "list")
    assert human.returncode == 0 and rid in human.stdout and "pending" in human.stdout

    waiting = json.loads(mpa(bob, "list", "--scope", "reviewable", "--json").stdout)
    assert [x["id"] for x in waiting] == [rid]

    own = mpa(alice, "approve", rid)
    assert own.returncode == 1
    assert "cannot approve their own request" in own.stderr and "self_approval" in own.stderr
    assert env.store.get_request(rid).approvals == ()

    ok = mpa(bob, "approve", r["url"], "--comment", "looks right")  # a link works as well as an id
    assert ok.returncode == 0, ok.stderr
    assert f"request {rid} is now approved" in ok.stdout

    shown = mpa(alice, "show", rid, env_extra={"COLUMNS": "30"})  # piped: never wrapped, whatever COLUMNS says
    assert shown.returncode == 0
    assert re.search(rf"^link\s+{re.escape(r['url'])}\s*$", shown.stdout, re.M), shown.stdout
    assert re.search(rf"approved by\s+{re.escape(B)} at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(1 of 1\)",
                     shown.stdout), shown.stdout
    data = json.loads(mpa(alice, "show", rid, "--json").stdout)
    assert data["state"] == "approved" and data["approvals"][0]["approver"] == B

    # The retry passes: the gateway's decision over what the store now holds allows alice.
    now = datetime.now(UTC)
    grants = policy.GrantSet(env.store.list_grants())
    decision = policy.decide(A, Target(LEDGER, "Adjust"), Mode.ENGINEERS_WITH_APPROVAL, grants,
                             env.store.find_requests(requester=A), now)
    assert decision.allowed and decision.approval_id == rid

    twice = mpa(bob, "approve", rid)
    assert twice.returncode == 1 and "already approved" in twice.stderr

    revoke = mpa(bob, "cancel", rid, "--reason", "approved the wrong one")
    assert revoke.returncode == 0 and "cancelled" in revoke.stdout


def two_to_review(env, tmp_path):
    """Bob's session, and the ids of two pending requests he may review (alice's, carol's)."""
    alice, bob, carol = (login(env, tmp_path, w) for w in (A, B, C))
    first = json.loads(mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "-r",
                           "refund for ticket 4411", "--json").stdout)["id"]
    second = json.loads(mpa(carol, "request", "rpc", f"/{LEDGER}/Adjust", "-r",
                            "reconcile ledger drift", "--json").stdout)["id"]
    return bob, (first, second)


def test_review_walks_pending_requests(env, tmp_path):
    bob, ids = two_to_review(env, tmp_path)
    res = mpa(bob, "review", input="a\nok by me\nr\nnot without a ticket\n")
    assert res.returncode == 0, res.stderr
    assert "1 of 2" in res.stdout and "2 of 2" in res.stdout
    states = {env.store.get_request(i).state.value for i in ids}
    assert states == {"approved", "rejected"}
    assert "nothing waits for your review" in mpa(bob, "review").stdout


def test_review_without_enough_answers_says_where_it_stopped(env, tmp_path):
    bob, ids = two_to_review(env, tmp_path)
    res = mpa(bob, "review", input="a\nok by me\n")  # an answer for the first request only
    assert res.returncode == 1
    assert ("no answer at request 2 of 2 (standard input ended or was interrupted): it and the ones "
            "after it were left as they are") in " ".join(res.stderr.split())
    assert sorted(env.store.get_request(i).state.value for i in ids) == ["approved", "pending"]


def test_cli_refusals_have_clear_messages_and_exit_codes(env, tmp_path):
    nobody = tmp_path / "nobody"
    res = mpa(nobody, "list", "--server", env.url)
    assert res.returncode == 3 and "not signed in" in res.stderr
    alice = login(env, tmp_path, A)
    res = mpa(alice, "show", "doesnotexist")
    assert res.returncode == 1 and "no approval request has id 'doesnotexist'" in res.stderr
    res = mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "--reason", "pls")
    assert res.returncode == 1 and "at least 10 characters" in res.stderr
    res = mpa(alice, "request", "rpc", "not-an-rpc", "--reason", "because I must")
    assert res.returncode == 2 and "/pkg.Service/Method" in res.stderr
    res = mpa(alice, "list", "--scope", "everything")
    assert res.returncode == 2
    res = mpa(alice, "list", "--state", "open")
    assert res.returncode == 2
    assert "--state 'open': use pending, approved, rejected, cancelled, expired" in " ".join(res.stderr.split())
    # a token that expired or was forged: exit 3, says so
    expired = env.issuer.mint(A, now=datetime.now(UTC).timestamp() - 7200, ttl_seconds=60)
    res = mpa(alice, "list", env_extra={"MPA_TOKEN": expired})
    assert res.returncode == 3 and "expired" in res.stderr
    # server down: exit 4
    res = mpa(alice, "list", "--server", "http://127.0.0.1:9")
    assert res.returncode == 4 and "cannot reach" in res.stderr


def test_gateway_request_gets_its_reason_from_mpa_request(env, tmp_path):
    gw = env.gateway_request(A)
    alice = login(env, tmp_path, A)
    res = mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "--reason", "refund for ticket 4411")
    assert res.returncode == 0 and "request updated" in res.stdout
    assert env.store.get_request(gw.id).reason == "refund for ticket 4411"


def test_login_with_oidc_device_flow(env, tmp_path):
    """``mpa login --issuer`` against an issuer that speaks the device flow (the dev issuer)."""
    jwks = env.issuer.serve()
    try:
        # the API trusts tokens signed by this issuer's key, so the device-flow token works
        base = jwks.url.rsplit("/.well-known", 1)[0]
        home = tmp_path / "dev-flow"
        environ = {**os.environ, "MPA_CONFIG_DIR": str(home)}
        proc = subprocess.Popen([sys.executable, "-m", "mpa.cli", "login", "--server", env.url,
                                 "--issuer", base], cwd=ROOT, env=environ, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = proc.stderr.readline()
            m = re.search(r"Open (\S+) and enter the code (\w+)", line)
            assert m, line
            resp = httpx.get(f"{base}/device", params={"user_code": m.group(2), "subject": C})
            assert resp.status_code == 200
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert f"as {C}" in out
        me = json.loads(mpa(home, "whoami", "--json").stdout)
        assert me["principal"] == C and isinstance(me["roles"], list)
    finally:
        jwks.close()


def test_request_bound_to_a_body_file(env, tmp_path):
    import hashlib
    alice = login(env, tmp_path, A)
    body = tmp_path / "req.bin"
    body.write_bytes(b"\x08\x01\x12\x03A-1")
    res = mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "-r", "refund for ticket 4411",
              "--body-file", str(body), "--max-uses", "1", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["body_sha256"] == hashlib.sha256(body.read_bytes()).hexdigest() and r["max_uses"] == 1


def test_help_lists_every_command_including_the_brokers(tmp_path):
    top = mpa(tmp_path, "--help", env_extra={"COLUMNS": "120"})
    assert top.returncode == 0
    for command in ("login", "request", "list", "review", "approve", "reject", "show", "cancel",
                    "fetch", "broker"):
        assert f" {command} " in top.stdout, command
    sub = mpa(tmp_path, "request", "--help", env_extra={"COLUMNS": "120"})
    for kind in ("rpc", "aws", "k8s"):
        assert f" {kind} " in sub.stdout, kind
    # A newcomer reads where to start, how scripts get JSON, and what exit codes mean.
    words = " ".join(top.stdout.split())  # help is wrapped to COLUMNS
    assert "Start with: mpa login" in words and "--json" in words and "Exit codes: 0 done" in words
    for command in ("whoami", "list", "show", "approve", "reject", "cancel"):
        res = mpa(tmp_path, command, "--help", env_extra={"COLUMNS": "120"})
        assert res.returncode == 0 and "--json" in res.stdout and "--server" in res.stdout, command
    for command in (("broker", "list"), ("broker", "show"), ("broker", "review"), ("request", "aws")):
        res = mpa(tmp_path, *command, "--help", env_extra={"COLUMNS": "120"})
        assert res.returncode == 0 and "--json" in res.stdout, command
    res = mpa(tmp_path, "fetch", "--help", env_extra={"COLUMNS": "120"})
    assert "-f" in res.stdout and "credential-process" in res.stdout


def test_dev_login_refused_where_the_server_trusts_a_real_issuer(tmp_path):
    with approvals_env(tmp_path, config={"dev_login": False}) as env:
        res = mpa(tmp_path / "x", "login", "--server", env.url, "--as", A)
        assert res.returncode == 3 and "does not offer dev sign-in" in res.stderr
        assert not (tmp_path / "x" / "session.json").exists()
        page = httpx.get(f"{env.url}/login")
        assert "DEVELOPMENT ONLY" not in page.text and "SSO proxy" in page.text


def test_review_walks_rpc_and_broker_credential_requests_together(env, tmp_path):
    """One `mpa review` session (after `mpa login`) covers RPC approvals and enclave broker requests."""
    from enclave_bridge.broker.notify import MemoryAuditLog
    from enclave_bridge.broker.server import start_broker
    from enclave_bridge.seeds import SeedBundle
    from tests.support.enclave_broker_env import StubSts, broker_config

    sts = StubSts()
    config = broker_config(env.issuer.jwks(), issuer=env.issuer.issuer, audience=env.issuer.audience,
                           oidc_issuer="http://127.0.0.1:1")
    audit = MemoryAuditLog()
    runtime = start_broker(config, SeedBundle.generate(), state_path=tmp_path / "broker.db", audit=[audit],
                           sts_client=sts.client(), cert_out=tmp_path / "broker.pem")
    try:
        alice, bob = (login(env, tmp_path, w) for w in (A, B))
        broker_env = {"MPA_BROKER": f"127.0.0.1:{runtime.port}", "MPA_BROKER_CERT": str(tmp_path / "broker.pem")}
        rpc_id = json.loads(mpa(alice, "request", "rpc", f"/{LEDGER}/Adjust", "-r", "refund 4411",
                                "--json").stdout)["id"]
        res = mpa(alice, "request", "aws", "platform-admin", "-r", "rotate keys", env_extra=broker_env)
        assert res.returncode == 0, res.stderr
        cred_id = res.stdout.split()[0]

        only_rpc = mpa(bob, "review", "--rpc-only", input="s\n", env_extra=broker_env)
        assert "1 of 1" in only_rpc.stdout and cred_id not in only_rpc.stdout
        only_broker = mpa(bob, "review", "--broker-only", input="s\n", env_extra=broker_env)
        assert "1 of 1" in only_broker.stdout and cred_id in only_broker.stdout and rpc_id not in only_broker.stdout

        res = mpa(bob, "review", input="a\nfine\na\nrotation ok\n", env_extra=broker_env)
        assert res.returncode == 0, res.stderr
        assert "1 of 2" in res.stdout and "2 of 2" in res.stdout
        assert env.store.get_request(rpc_id).state.value == "approved"
        assert f"approved: {cred_id} is now approved" in res.stdout
        fetched = mpa(alice, "fetch", cred_id, "--format", "credential-process", env_extra=broker_env)
        assert fetched.returncode == 0, fetched.stderr
        assert json.loads(fetched.stdout)["AccessKeyId"].startswith("ASIA")
        assert [e.kind for e in audit if e.request_id == cred_id] == [
            "credential.requested", "credential.approved", "credential.fetched"]
        # Without a broker configured, `mpa review` is the RPC walk it always was.
        assert "nothing waits for your review" in mpa(bob, "review").stdout
    finally:
        runtime.close()
        sts.close()
