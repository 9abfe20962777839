"""Slack's webhook is down, then slow, while engineers work through the gateway: approval-mode
calls open requests (the gateway), requesters say why and approvers approve (the approvals
service's API, which tells Slack), the calls then pass; a plain load runs meanwhile.

Goals: zero wrong allows; every decision and API answer as without the fault (each request
refused with its link, approved, then passing; API answers within 1.5 s); once Slack is back,
every message delivered exactly once (no duplicate posts, none lost).
"""
from __future__ import annotations

import json
import pathlib
import time

import grpc
import httpx

from devstack.processes import free_port
from tests.support.fake_slack import FakeSlack
from tests.support.faults.approvals import uses_spent
from tests.support.faults.load import ALLOW, DENY, Caller, MixedLoad
from tests.support.faults.outcome import ScenarioResult
from tests.support.gateway_harness import ACCOUNTS, READ_ACCOUNT, gateway_with_approvals

APPROVER = "alice"
LIST = f"/{ACCOUNTS}/ListAccounts"
#: Slack's answer time while slow, above the delivery's 0.5 s send timeout.
SLOW_S = 1.5


def slack_faults(workdir: pathlib.Path, *, seconds: float = 5.0,
                 requests_per_phase: int = 2) -> list[ScenarioResult]:
    """Slack down for ``seconds``, then slow for ``seconds``, then back; one result per fault."""
    port = free_port()
    phases = {"down": [f"dev{i}" for i in range(requests_per_phase)],
              "slow": [f"dev{i}" for i in range(requests_per_phase, 2 * requests_per_phase)]}
    engineers = ["erin", APPROVER, *phases["down"], *phases["slow"]]
    slack: FakeSlack | None = None
    results: dict[str, ScenarioResult] = {}
    opened: dict[str, list[str]] = {}
    with gateway_with_approvals(
            workdir, engineers=engineers,
            approvals={"config": {"slack_webhook_url": f"http://127.0.0.1:{port}/services/T0/B0/x",
                                  "slack_spool_path": str(workdir / "slack-spool.db")},
                       "slack_timeout": 0.5, "slack_backoff": (0.2, 1.0), "audit_interval": 0.2},
    ) as (gw, approvals, base):
        load = MixedLoad(gw.gateway, [
            Caller("engineer ListAccounts", LIST, gw.token("erin"), ALLOW, pause=0.02),
            Caller("non-engineer ListAccounts", LIST, gw.token("nina"), DENY, pause=0.05)])
        try:
            with load:
                time.sleep(1.0)
                for phase, requesters in phases.items():
                    if phase == "slow":
                        slack = FakeSlack(port, mode="slow", slow_s=SLOW_S)
                    start = time.monotonic()
                    r = results[phase] = ScenarioResult(f"Slack webhook {phase}")
                    opened[phase] = [_request_loop(gw, base, who, r) for who in requesters]
                    r.detail.append(f"{len(requesters)} requests opened, reasoned, approved and used in "
                                    f"{time.monotonic() - start:.1f} s")
                    time.sleep(max(0.0, start + seconds - time.monotonic()))
                    counts = approvals.spool.counts()
                    r.detail.append(f"after {seconds:g} s of Slack {phase}: spool {counts}, "
                                    f"{len(slack.received) if slack else 0} posts taken so far")
                    if phase == "down":
                        r.goal("nothing delivered while Slack is down, all kept", counts["delivered"] == 0
                               and counts["pending"] >= 2 * len(requesters), str(counts))
                    _load_window(r, load, start)
                if slack is None:
                    slack = FakeSlack(port)
                back = time.monotonic()
                slack.mode = "ok"
                spool = approvals.spool
                deadline = back + 60
                while time.monotonic() < deadline and (spool.counts()["pending"] or
                                                       spool.counts()["delivered"] < 4 * requests_per_phase):
                    time.sleep(0.2)
                recovered = time.monotonic() - back
                time.sleep(SLOW_S + 1.0)  # a resent message would land by now
                keys = spool.keys()
                pending = spool.counts()["pending"]
        finally:
            if slack is not None:
                slack.close()
    posted = [json.dumps(p, sort_keys=True) for _, p in slack.received]
    for phase, r in results.items():
        r.recovery_s = recovered
        ids = opened[phase]
        r.uses_spent = sum(uses_spent(gw.store_url, i) for i in ids)
        r.goal("uses spent = calls passed", r.uses_spent == r.uses_passed, f"{r.uses_spent} / {r.uses_passed}")
        want = {f"{k}:{i}" for i in ids for k in ("new", "approved")}
        spooled = [k for k in keys if any(i in k for i in ids)]
        per_request = {i: sum(i in p for p in posted) for i in ids}
        dupes = len(posted) - len(set(posted))
        r.detail += [f"Slack messages for these requests: spooled {sorted(spooled)}, posted per request "
                     f"{per_request}, all posts in the run {len(posted)} ({dupes} duplicated), still pending {pending}; "
                     f"all delivered {recovered:.1f} s after Slack was back"]
        r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls}")
        r.goal("every message delivered exactly once after recovery",
               want <= set(spooled) and pending == 0 and dupes == 0 and
               all(n == sum(i in k for k in spooled) for i, n in per_request.items()),
               f"{len(want)} expected, {sum(per_request.values())} posted, {dupes} duplicated")
    return [results["down"], results["slow"]]


def _request_loop(gw, base: str, who: str, r: ScenarioResult) -> str:
    """``who`` calls an approval-mode method (refused with a link), says why, ``APPROVER``
    approves, the call passes. Records answers and API latencies in ``r``; returns the id."""
    first = gw.call(READ_ACCOUNT, as_=who)
    r.calls += 1
    rid = (first.request_url or "").rsplit("/", 1)[-1]
    ok = first.code is grpc.StatusCode.PERMISSION_DENIED and bool(rid)
    r.goal(f"{who}: first call refused with a request link", ok, first.code.name)
    slowest = 0.0
    for actor, path, body in ((who, "complete", {"reason": f"ticket for {who}"}), (APPROVER, "approve", {})):
        t = time.monotonic()
        answer = httpx.post(f"{base}/api/v1/requests/{rid}/{path}", json=body, timeout=20,
                            headers={"Authorization": f"Bearer {gw.token(actor)}"})
        slowest = max(slowest, time.monotonic() - t)
        r.goal(f"{who}: {path} answered 200", answer.status_code == 200, str(answer.status_code))
    r.goal(f"{who}: API answered within 1.5 s", slowest < 1.5, f"{slowest:.2f} s")
    then = gw.call(READ_ACCOUNT, as_=who)
    r.calls += 1
    r.uses_passed = (r.uses_passed or 0) + (then.code is grpc.StatusCode.OK)
    r.unavailable += (first.code is grpc.StatusCode.UNAVAILABLE) + (then.code is grpc.StatusCode.UNAVAILABLE)
    r.goal(f"{who}: approved call passes", then.code is grpc.StatusCode.OK, then.code.name)
    return rid


def _load_window(r: ScenarioResult, load: MixedLoad, start: float) -> None:
    """Add the plain load's answers since ``start`` to ``r``."""
    answers = {c.name: load.loads[c.name].between(start) for c in load.callers}
    r.calls += sum(len(a) for a in answers.values())
    r.wrong_allows += sum(1 for _, code in answers["non-engineer ListAccounts"] if code is grpc.StatusCode.OK)
    r.unavailable += sum(1 for a in answers.values() for _, c in a if c is grpc.StatusCode.UNAVAILABLE)
    plain = [c for _, c in answers["engineer ListAccounts"]]
    r.detail.append(f"plain load meanwhile: {len(plain)} engineer calls, "
                    f"{sum(c is grpc.StatusCode.OK for c in plain)} OK; "
                    f"{len(answers['non-engineer ListAccounts'])} non-engineer calls")
    r.goal("plain load unaffected", bool(plain) and all(c is grpc.StatusCode.OK for c in plain))
