"""Routing (issue 10, finding 5): every request lists who may approve it now, from the grants;
when nobody can, the requester hears so at once (API, CLI, page, Slack), and Slack mentions the
eligible reviewers by their Slack member ids."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from datetime import UTC, datetime

import policy
from mpa.slack import SlackNotifier
from rpcauthz.slack_outbox import SlackSpool
from tests.support.approvals_env import LEDGER, approvals_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
A, B, C, D, E = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com",
                 "erin@example.com")


def ask(env, who, method, **extra):
    resp = env.call("POST", "/api/v1/requests", who, json={
        "service": LEDGER, "method": method, "reason": "refund for ticket 4411", **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_each_request_lists_who_can_approve_it_now(tmp_path):
    with approvals_env(tmp_path) as env:
        adjust = ask(env, A, "Adjust")  # ENGINEERS_WITH_APPROVAL
        assert adjust["eligible_approvers"] == [B, C, D, E] and adjust["routing_note"] == ""
        close = ask(env, A, "Close")    # CONTRIBUTORS_WITH_APPROVAL: alice and carol contribute
        assert close["eligible_approvers"] == [C]
        page = env.call("GET", f"/requests/{close['id']}", A)
        assert 'id="eligible">carol@example.com<' in page.text and "routing-note" not in page.text


def test_nobody_eligible_is_said_at_once_in_api_cli_page_and_slack(tmp_path):
    with approvals_env(tmp_path) as env:
        env.store.delete_grant(C, "contributor", LEDGER)  # alice is now Ledger's only contributor
        r = ask(env, A, "Close")
        assert r["eligible_approvers"] == []
        assert r["routing_note"].startswith("Nobody can approve this request now")
        assert f"a contributor of {LEDGER} other than the requester" in r["routing_note"]

        page = env.call("GET", f"/requests/{r['id']}", A)
        assert 'id="routing-note"' in page.text and "Nobody can approve this request now" in page.text

        env_vars = {k: v for k, v in os.environ.items() if not k.startswith("MPA_")}
        env_vars.update(MPA_SERVER=env.url, MPA_TOKEN=env.issuer.mint(A))
        shown = subprocess.run([sys.executable, "-m", "mpa.cli", "show", r["id"]], cwd=ROOT,
                               env=env_vars, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "WARNING" in shown.stdout and "Nobody can approve" in shown.stdout
        assert "can approve now  nobody" in " ".join(shown.stdout.split("\n"))

        spool = SlackSpool(str(tmp_path / "spool.db"))
        try:
            notifier = SlackNotifier(env.store, spool, lambda i: f"http://approvals/requests/{i}")
            created = [e for e in env.store.list_audit() if e.request_id == r["id"]][0]
            _, payload = notifier.message_for(created, env.store.get_request(r["id"]))
            blocks = str(payload["blocks"])
            assert ":warning: Nobody can approve this request now" in blocks
        finally:
            spool.close()


def test_slack_mentions_the_eligible_reviewers(tmp_path):
    with approvals_env(tmp_path) as env:
        r = ask(env, A, "Close")
        spool = SlackSpool(str(tmp_path / "spool.db"))
        try:
            notifier = SlackNotifier(env.store, spool, lambda i: f"http://approvals/requests/{i}",
                                     {C: "U0CAROL1"})
            created = [e for e in env.store.list_audit() if e.request_id == r["id"]][0]
            key, payload = notifier.message_for(created, env.store.get_request(r["id"]))
            assert key == f"new:{r['id']}"
            assert "*Can approve*: <@U0CAROL1>" in str(payload["blocks"])
            # an engineers' request names every other engineer, mapped or not
            r2 = ask(env, A, "Adjust")
            created = [e for e in env.store.list_audit() if e.request_id == r2["id"]][0]
            _, payload = notifier.message_for(created, env.store.get_request(r2["id"]))
            assert f"*Can approve*: {B}, <@U0CAROL1>, {D}, {E}" in str(payload["blocks"])
        finally:
            spool.close()


def test_eligible_approvers_is_pure_and_excludes_requester_and_past_approvers():
    now = datetime.now(UTC)
    grants = policy.GrantSet([policy.Grant(p, policy.Role.ENGINEER) for p in (A, B, C)])
    r = policy.open_request(request_id="r1", requester=A, target=policy.Target(LEDGER, "Adjust"),
                            mode=policy.Mode.ENGINEERS_WITH_APPROVAL, grants=grants, now=now,
                            required_approvals=2, reason="x" * 12)
    assert policy.eligible_approvers(r, grants, now) == (B, C)
    r = policy.approve(r, B, grants, now)
    assert policy.eligible_approvers(r, grants, now) == (C,)
