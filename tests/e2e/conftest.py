"""One gateway (real Envoy, ext_authz on SQLite, demo services, dev issuer) per module."""
from __future__ import annotations

import pytest

from policy import Grant, Role
from tests.support.bad_reflection import MalformedReflection, SilentListener, closed_port
from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack

#: The DESIGN table's cast.
NONENG = "nina"          # holds no engineer grant
ENGINEER = "erin"        # engineer, no team
CONTRIB = "carol"        # engineer, contributor of Accounts and Ledger
CONTRIB2 = "dave"        # another contributor of Accounts and Ledger (an approver for carol)
OTHER = "otto"           # engineer, contributor of another team's service
ONCALL = "sam"           # engineer, security on-call
ONCALL2 = "sol"          # another security on-call


def cast_grants() -> list[Grant]:
    g = [Grant(p, Role.ENGINEER) for p in (ENGINEER, CONTRIB, CONTRIB2, OTHER, ONCALL, ONCALL2)]
    g += [Grant(p, Role.CONTRIBUTOR, svc) for p in (CONTRIB, CONTRIB2) for svc in (ACCOUNTS, LEDGER)]
    g += [Grant(OTHER, Role.CONTRIBUTOR, "other.team.v1.Billing")]
    g += [Grant(p, Role.SECURITY_ONCALL) for p in (ONCALL, ONCALL2)]
    return g


#: Methods with no option fall to this (not the out-of-the-box BREAK_GLASS_ONLY, so the
#: test can tell "the configured default" from "the built-in default").
CONFIGURED_DEFAULT = "CONTRIBUTORS_WITHOUT_APPROVAL"


#: Made-up services whose reflection misbehaves (routed nowhere; ext_authz runs first).
DOWN, SLOW, MALFORMED = "rpcauthz.broken.v1.Down", "rpcauthz.broken.v1.Slow", "rpcauthz.broken.v1.Malformed"


@pytest.fixture(scope="module")
def sqlite_gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway")
    silent, malformed = SilentListener(), MalformedReflection()
    try:
        with GatewayStack(workdir, store_url=f"sqlite:///{workdir / 'store.db'}", grants=cast_grants(),
                          extauthz={"default_mode": CONFIGURED_DEFAULT,
                                    "approvals.base_url": "https://mpa.example.test"},
                          reflection_static={DOWN: closed_port(), SLOW: silent.address,
                                             MALFORMED: malformed.address}) as gw:
            yield gw
    finally:
        silent.close()
        malformed.close()
