"""The reflection endpoint of one service (Ledger) hangs, then answers garbage, under a mixed
load; a relay in front of the real Ledger's reflection makes both faults and restores it.

Goals per fault: zero wrong allows; once the cached answer expired, calls to Ledger are
UNAVAILABLE (never an allow on a mode nobody could read); calls to the other service
(Accounts) are unaffected; Ledger's calls pass again within 5 s of the endpoint's return.
"""
from __future__ import annotations

import pathlib
import time

import grpc

from devstack.processes import free_port
from policy import Grant, Role
from tests.support.bad_reflection import MalformedReflection
from tests.support.faults.load import ALLOW, DENY, Caller, MixedLoad
from tests.support.faults.outcome import ScenarioResult
from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack
from tests.support.store_tcp_proxy import TcpProxy

ENGINEER, NONENG = "erin", "nina"
BALANCE, POST_ENTRY, LIST = f"/{LEDGER}/GetBalance", f"/{LEDGER}/PostEntry", f"/{ACCOUNTS}/ListAccounts"
#: Short cache times so a fault shows within a second (production: ttl 60, stale 120).
TTL_S, DEADLINE_S, BACKOFF_S = 1.0, 1.0, 0.5
LEDGER_CALLERS = ["engineer Ledger.GetBalance", "non-engineer Ledger.GetBalance",
                  "engineer Ledger.PostEntry (contributors only)"]


def reflection_faults(workdir: pathlib.Path, *, seconds: float = 6.0) -> list[ScenarioResult]:
    """Ledger's reflection endpoint hung for ``seconds``, back, garbage for ``seconds``, back."""
    relay = TcpProxy("127.0.0.1", 9, free_port())  # pointed at Ledger once it runs
    relay.start()
    garbage = MalformedReflection()
    results: list[ScenarioResult] = []
    try:
        with GatewayStack(workdir, store_url=f"sqlite:///{workdir / 'store.db'}",
                          grants=[Grant(ENGINEER, Role.ENGINEER)],
                          reflection_static={LEDGER: relay.address},
                          extauthz={"reflection.cache.ttl": TTL_S, "reflection.cache.stale_window": 0,
                                    "reflection.cache.error_backoff": BACKOFF_S,
                                    "reflection.cache.deadline": DEADLINE_S}) as gw:
            ledger_port = gw.upstreams["ledger"].port
            relay.retarget("127.0.0.1", ledger_port)
            load = MixedLoad(gw.gateway, [
                Caller("engineer Accounts.ListAccounts", LIST, gw.token(ENGINEER), ALLOW, pause=0.01),
                Caller(LEDGER_CALLERS[0], BALANCE, gw.token(ENGINEER), ALLOW, threads=2, pause=0.01),
                Caller(LEDGER_CALLERS[1], BALANCE, gw.token(NONENG), DENY, pause=0.02),
                Caller(LEDGER_CALLERS[2], POST_ENTRY, gw.token(ENGINEER), DENY, pause=0.02),
            ])
            with load:
                load.wait_expected(time.monotonic(), within=20.0)  # the cache holds Ledger's answer
                for name, break_it in (("hung", relay.hang),
                                       ("returning garbage", lambda: relay.retarget("127.0.0.1", garbage.port))):
                    start = time.monotonic()
                    break_it()
                    time.sleep(seconds)
                    relay.resume()
                    relay.retarget("127.0.0.1", ledger_port)
                    end = time.monotonic()
                    # Until Ledger answers as before for a second (the goal allows 5 s to get there).
                    load.wait_expected(end, within=7.0, names=LEDGER_CALLERS)
                    results.append(_judge(f"reflection endpoint {name} {seconds:g} s", load, start, end,
                                          time.monotonic()))
    finally:
        relay.resume()
        relay.stop()
        garbage.close()
    return results


def _judge(name: str, load: MixedLoad, start: float, end: float, until: float) -> ScenarioResult:
    r = ScenarioResult(name)
    window = {c.name: c for c in load.callers}
    answers = {n: load.loads[n].between(start - 1.0, until) for n in window}
    r.calls = sum(len(a) for a in answers.values())
    r.wrong_allows = sum(1 for n, a in answers.items() if window[n].expect == DENY
                         for _, code in a if code is grpc.StatusCode.OK)
    r.unavailable = sum(1 for a in answers.values() for _, code in a if code is grpc.StatusCode.UNAVAILABLE)
    expired = start + TTL_S + 0.5
    ledger_in_fault = [code for n in LEDGER_CALLERS for t, code in answers[n] if expired <= t < end]
    other = answers["engineer Accounts.ListAccounts"]
    r.recovery_s = load.recovery_s(start, end, names=LEDGER_CALLERS)
    ledger_after = [code for n in LEDGER_CALLERS[:1] for t, code in answers[n] if t > end + r.recovery_s]
    r.detail += [
        "answers by caller (this window): " + str({n: _codes(a) for n, a in answers.items()}),
        f"Ledger calls after its cached answer expired, during the fault: {_codes_of(ledger_in_fault)}",
        f"Ledger answers as before {r.recovery_s:.1f} s after the endpoint returned",
    ]
    r.goal("zero wrong allows", r.wrong_allows == 0, f"{r.wrong_allows} of {r.calls}")
    r.goal("Ledger calls are UNAVAILABLE once the cache expired", bool(ledger_in_fault) and
           all(c is grpc.StatusCode.UNAVAILABLE for c in ledger_in_fault), _codes_of(ledger_in_fault))
    r.goal("Accounts calls unaffected", bool(other) and all(c is grpc.StatusCode.OK for _, c in other),
           _codes(other))
    r.goal("Ledger recovers within 5 s of the endpoint's return", r.recovery_s <= 5.0 and bool(ledger_after)
           and all(c is grpc.StatusCode.OK for c in ledger_after), f"{r.recovery_s:.1f} s")
    return r


def _codes(answers: list[tuple[float, grpc.StatusCode]]) -> str:
    return _codes_of([c for _, c in answers])


def _codes_of(codes: list[grpc.StatusCode]) -> str:
    out: dict[str, int] = {}
    for c in codes:
        out[c.name] = out.get(c.name, 0) + 1
    return str(out)
