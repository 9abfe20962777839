"""Every mode x every kind of caller, through real Envoy to real gRPC services: the DESIGN table.

A real grpcio client calls through Envoy (jwt_authn + ext_authz) with a dev-issuer token;
the status codes it sees are the product's answer.
"""
from __future__ import annotations

import json

import grpc
import pytest

from tests.e2e.conftest import CONFIGURED_DEFAULT, CONTRIB, ENGINEER, NONENG, ONCALL, OTHER
from tests.support.gateway_harness import ACCOUNTS, LEDGER

pytestmark = [pytest.mark.envoy]

OK, DENY, APPROVAL = "ok", "deny", "approval"
CALLERS = (NONENG, ENGINEER, CONTRIB, OTHER, ONCALL)

#: method -> (mode, expected answer for each of CALLERS). The DESIGN mode table.
TABLE = {
    "ListAccounts": ("ENGINEERS_WITHOUT_APPROVAL", (DENY, OK, OK, OK, OK)),
    "ReadAccount": ("ENGINEERS_WITH_APPROVAL", (DENY, APPROVAL, APPROVAL, APPROVAL, APPROVAL)),
    "UpdateLimits": ("CONTRIBUTORS_WITHOUT_APPROVAL", (DENY, DENY, OK, DENY, DENY)),
    "CloseAccount": ("CONTRIBUTORS_WITH_APPROVAL", (DENY, DENY, APPROVAL, DENY, DENY)),
    "EraseCustomerData": ("BREAK_GLASS_ONLY", (DENY, DENY, DENY, DENY, APPROVAL)),
}


def classify(result) -> str:
    if result.code is grpc.StatusCode.OK:
        return OK
    assert result.code is grpc.StatusCode.PERMISSION_DENIED, result.render()
    if "approval required" in result.message:
        assert result.request_url and result.request_url in result.message, result.render()
        return APPROVAL
    assert result.request_url is None, result.render()
    return DENY


CASES = [(m, mode, who, want) for m, (mode, wants) in TABLE.items() for who, want in zip(CALLERS, wants, strict=True)]


@pytest.mark.parametrize("method,mode,who,want", CASES,
                         ids=[f"{m}-{who}" for m, _, who, _ in CASES])
def test_mode_table(sqlite_gateway, method, mode, who, want):
    path = f"/{ACCOUNTS}/{method}"
    result = sqlite_gateway.call(path, as_=who, data={"accountId": "A-1"})
    assert classify(result) == want, result.render()
    if want == OK:
        echo = json.loads(result.replies[0]["message"])
        assert echo["method"] == method
        assert echo["metadata"]["x-rpcauthz-principal"] == who
        assert "authorization" not in echo["metadata"]  # the token stays at the gateway
    else:
        # Every refusal says which rule, for whom, for which method, under which mode.
        assert who in result.message and path in result.message and mode in result.message \
            or "principal.not_engineer" in result.message
        assert "rule " in result.message


def test_service_default_and_method_override(sqlite_gateway):
    # Ledger's service default is CONTRIBUTORS_WITH_APPROVAL; GetBalance overrides it.
    assert sqlite_gateway.call(f"/{LEDGER}/GetBalance", as_=ENGINEER).code is grpc.StatusCode.OK
    r = sqlite_gateway.call(f"/{LEDGER}/PostEntry", as_=CONTRIB)
    assert classify(r) == APPROVAL and "CONTRIBUTORS_WITH_APPROVAL" in r.message
    r = sqlite_gateway.call(f"/{LEDGER}/PostEntry", as_=ENGINEER)
    assert classify(r) == DENY


def test_unannotated_method_falls_to_configured_default(sqlite_gateway):
    r = sqlite_gateway.call(f"/{ACCOUNTS}/Ping", as_=ENGINEER)
    assert classify(r) == DENY and CONFIGURED_DEFAULT in r.message
    assert sqlite_gateway.call(f"/{ACCOUNTS}/Ping", as_=CONTRIB).code is grpc.StatusCode.OK


def test_access_log_carries_the_decision(sqlite_gateway):
    ok = sqlite_gateway.call(f"/{ACCOUNTS}/ListAccounts", as_=ENGINEER,
                             metadata=[("x-request-marker", "log-check")])
    assert ok.code is grpc.StatusCode.OK
    denied = sqlite_gateway.call(f"/{ACCOUNTS}/UpdateLimits", as_=OTHER)
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED

    def find(lines, principal, method, outcome):
        return [ln for ln in lines if ln.get("principal") == principal and ln["path"].endswith(method)
                and ln.get("outcome") == outcome]

    import time
    deadline = time.monotonic() + 15
    while True:
        lines = sqlite_gateway.access_log_lines()
        allow = find(lines, ENGINEER, "ListAccounts", "allow")
        deny = find(lines, OTHER, "UpdateLimits", "deny")
        if (allow and deny) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert allow and deny, lines[-5:]
    assert allow[-1]["mode"] == "ENGINEERS_WITHOUT_APPROVAL" and allow[-1]["decision_id"]
    assert allow[-1]["grpc_status"] == 0
    assert deny[-1]["rule"] == "contributors_without_approval.not_contributor"
    assert deny[-1]["grpc_status"] == 7  # trailers-only gRPC answer (HTTP 200, grpc-status 7)
