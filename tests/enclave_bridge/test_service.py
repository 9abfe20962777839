"""The broker's rules: MPA on credential requests, STS and OIDC minting, sealed state, audit."""
from __future__ import annotations

import dataclasses
import json
import os
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from jwcrypto import jwk
from jwcrypto import jwt as jwcrypto_jwt

from devstack.devissuer import DevIssuer
from enclave_bridge.broker.notify import MemoryAuditLog, slack_text
from enclave_bridge.broker.service import BrokerService, KubernetesToken
from enclave_bridge.credentials.k8s import OidcIssuer
from enclave_bridge.credentials.sts import StsMinter, session_duration
from enclave_bridge.sealed import SealedRecords, SqliteHostStorage
from enclave_bridge.seeds import SeedBundle
from policy import InvalidRequest, NotEligible, RequestClosed, RequestExpired, SelfApproval
from tests.conftest import free_port
from tests.support.enclave_broker_env import ROLE_ARN, StubSts, broker_config

ALICE, BOB, CAROL, MALLORY = "alice@example.com", "bob@example.com", "carol@example.com", "mallory@example.com"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(tmp_path):
    sts = StubSts()
    port = free_port()
    oidc_issuer = f"http://127.0.0.1:{port}"
    seeds = SeedBundle.generate()
    oidc = OidcIssuer(oidc_issuer, seeds.signing_key())
    oidc_server = oidc.serve("127.0.0.1", port)
    dev = DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience, oidc_issuer=oidc_issuer,
                           oncall=(ALICE, CAROL))
    audit = MemoryAuditLog()
    clock = Clock()
    state = tmp_path / "state.db"

    def make() -> BrokerService:
        return BrokerService(config, SealedRecords(SqliteHostStorage(state), seeds.state_key), audit=[audit],
                             sts=StsMinter(sts.client()), oidc=oidc, clock=clock)

    try:
        yield {"make": make, "broker": make(), "sts": sts, "audit": audit, "clock": clock,
               "oidc_issuer": oidc_issuer, "seeds": seeds, "state": state}
    finally:
        oidc_server.close()
        sts.close()


def test_aws_loop_sets_source_identity_tags_and_duration(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="rotate node group", duration_seconds=1200)
    assert cr.request.state.value == "pending"
    b.review(BOB, cr.id, approve_it=True, comment="ok")
    creds = b.fetch(ALICE, cr.id)
    assert creds.access_key_id.startswith("ASIA") and creds.role_arn == ROLE_ARN
    (sent,) = env["sts"].requests
    assert sent["Action"] == "AssumeRole"
    assert sent["RoleArn"] == ROLE_ARN
    assert sent["SourceIdentity"] == ALICE
    assert sent["DurationSeconds"] == "1200"
    assert sent["RoleSessionName"].startswith(f"mpa-{cr.id}-")
    tags = {sent[f"Tags.member.{i}.Key"]: sent[f"Tags.member.{i}.Value"] for i in (1, 2, 3)}
    assert tags == {"mpa:requester": ALICE, "mpa:approver": BOB, "mpa:request-id": cr.id}
    kinds = [e.kind for e in env["audit"]]
    assert kinds == ["credential.requested", "credential.approved", "credential.fetched"]
    fetched = env["audit"][-1]
    assert fetched.actor == ALICE and fetched.detail["source_identity"] == ALICE
    assert "secret" not in json.dumps(fetched.to_json()).lower().replace("secret_access", "")


def test_session_duration_is_the_shortest_that_fits():
    assert session_duration(1200, 3000) == 1200
    assert session_duration(None, 3600) == 3600
    assert session_duration(None, 2000) == 2000          # never outlives the approval...
    assert session_duration(None, 100) == 900            # ...except STS's 900 s floor
    assert session_duration(7200, 99999) == 3600         # never above an hour
    assert session_duration(None, 99999, role_max=1800) == 1800


def test_nobody_approves_their_own_request(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    with pytest.raises(SelfApproval):
        b.review(ALICE, cr.id, approve_it=True)
    with pytest.raises(SelfApproval):
        b.review(ALICE, cr.id, approve_it=False)


def test_only_engineers_request_and_approve(env):
    b = env["broker"]
    with pytest.raises(NotEligible):
        b.request(MALLORY, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    with pytest.raises(NotEligible):
        b.review(MALLORY, cr.id, approve_it=True)
    with pytest.raises(NotEligible):
        b.list(MALLORY)


def test_fetch_refusals(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    with pytest.raises(RequestClosed, match="not approved"):
        b.fetch(ALICE, cr.id)
    b.review(BOB, cr.id, approve_it=True)
    with pytest.raises(NotEligible, match="only alice"):
        b.fetch(BOB, cr.id)
    env["clock"].now += timedelta(hours=2)
    with pytest.raises(RequestClosed, match="expired"):
        b.fetch(ALICE, cr.id)
    assert env["sts"].requests == []


def test_rejected_request_cannot_be_fetched(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    b.review(BOB, cr.id, approve_it=False, comment="use the pipeline")
    with pytest.raises(RequestClosed, match="rejected"):
        b.fetch(ALICE, cr.id)
    with pytest.raises(RequestClosed):
        b.review(CAROL, cr.id, approve_it=True)
    assert env["audit"][-1].kind == "request.rejected"


def test_pending_request_expires(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    env["clock"].now += timedelta(hours=2)
    with pytest.raises((RequestExpired, RequestClosed)):
        b.review(BOB, cr.id, approve_it=True)
    assert b.get(BOB, cr.id).request.state.value == "expired"


def test_break_glass_role_needs_incident_and_oncall_approver(env):
    b = env["broker"]
    with pytest.raises(InvalidRequest, match="incident"):
        b.request(ALICE, kind="aws", name="break-glass", reason="read the NAT gateway flow logs")
    with pytest.raises(NotEligible):
        b.request(BOB, kind="aws", name="break-glass", reason="read the NAT gateway flow logs", incident="INC-1")
    cr = b.request(ALICE, kind="aws", name="break-glass", reason="read the NAT gateway flow logs", incident="INC-1")
    with pytest.raises(NotEligible):
        b.review(BOB, cr.id, approve_it=True)
    b.review(CAROL, cr.id, approve_it=True)
    b.fetch(ALICE, cr.id)
    assert env["sts"].requests[-1]["DurationSeconds"] == "1800"


def test_bad_requests_are_refused_with_what_was_wrong(env):
    b = env["broker"]
    with pytest.raises(InvalidRequest, match="unknown AWS role 'root'"):
        b.request(ALICE, kind="aws", name="root", reason="read the NAT gateway flow logs")
    with pytest.raises(InvalidRequest, match="groups system:masters are not offered"):
        b.request(ALICE, kind="kubernetes", name="prod", groups=["system:masters"], reason="read the NAT gateway flow logs")
    with pytest.raises(InvalidRequest, match="name the groups"):
        b.request(ALICE, kind="kubernetes", name="prod", reason="read the NAT gateway flow logs")
    for reason in ("  ", "x", "   fix it   "):  # blanks around it do not count
        with pytest.raises(InvalidRequest, match="a reason of at least 10 characters is required: say why "
                                                 "you need these credentials"):
            b.request(ALICE, kind="aws", name="platform-admin", reason=reason)
    with pytest.raises(InvalidRequest, match="the reason is 2001 characters long; the limit is 2000"):
        b.request(ALICE, kind="aws", name="platform-admin", reason="r" * 2001)
    with pytest.raises(InvalidRequest, match="the incident is 201 characters long; the limit is 200"):
        b.request(ALICE, kind="aws", name="break-glass", reason="read the NAT gateway flow logs", incident="I" * 201)
    with pytest.raises(InvalidRequest, match="duration"):
        b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs", duration_seconds=7200)


def test_review_comments_are_bounded_and_the_shortest_reason_is_configurable(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    with pytest.raises(InvalidRequest, match="the comment is 2001 characters long; the limit is 2000"):
        b.review(BOB, cr.id, approve_it=True, comment="c" * 2001)
    assert b.get(BOB, cr.id).request.state.value == "pending"  # nothing recorded
    terse = BrokerService(dataclasses.replace(b.config, min_reason_length=3),
                          SealedRecords(SqliteHostStorage(env["state"]), env["seeds"].state_key),
                          audit=[env["audit"]], sts=StsMinter(env["sts"].client()),
                          oidc=OidcIssuer(env["oidc_issuer"], env["seeds"].signing_key()), clock=env["clock"])
    assert terse.request(ALICE, kind="aws", name="platform-admin", reason="ops").request.reason == "ops"
    with pytest.raises(InvalidRequest, match="at least 3 characters"):
        terse.request(ALICE, kind="aws", name="platform-admin", reason="ok")


def test_restart_keeps_requests_and_approvals(env):
    cr = env["broker"].request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    env["broker"].review(BOB, cr.id, approve_it=True)
    again = env["make"]()  # a new enclave process over the same host state
    got = again.get(CAROL, cr.id)
    assert got.request.state.value == "approved" and got.request.approvers == (BOB,)
    again.fetch(ALICE, cr.id)
    assert env["sts"].requests[-1]["SourceIdentity"] == ALICE


def test_lists_mine_and_reviewable(env):
    b = env["broker"]
    a = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    c = b.request(CAROL, kind="kubernetes", name="prod", groups=["viewer"], reason="look at the prod cluster pods")
    assert [r.id for r in b.list(ALICE, mine=True)] == [a.id]
    assert [r.id for r in b.list(ALICE, reviewable=True)] == [c.id]
    assert {r.id for r in b.list(BOB, reviewable=True)} == {a.id, c.id}


def _fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_kubernetes_token_validates_with_an_independent_library_against_served_jwks(env):
    b, clock = env["broker"], env["clock"]
    cr = b.request(ALICE, kind="kubernetes", name="prod", groups=["platform-admin"], reason="drain node")
    b.review(BOB, cr.id, approve_it=True)
    minted = b.fetch(ALICE, cr.id)
    assert isinstance(minted, KubernetesToken)

    discovery = _fetch_json(env["oidc_issuer"] + "/.well-known/openid-configuration")
    assert discovery["issuer"] == env["oidc_issuer"]
    keyset = jwk.JWKSet.from_json(json.dumps(_fetch_json(discovery["jwks_uri"])))
    token = jwcrypto_jwt.JWT(jwt=minted.token, key=keyset, algs=["RS256"],
                             check_claims={"iss": env["oidc_issuer"], "aud": "prod-apiserver",
                                           "exp": None, "sub": ALICE})
    claims = json.loads(token.claims)
    assert claims["groups"] == ["platform-admin"]
    assert claims["exp"] - claims["iat"] == 900  # the cluster's cap, shorter than the approval
    assert claims["exp"] == int(minted.expiration.timestamp())
    assert claims["mpa_request"] == cr.id
    assert claims["iat"] == int(clock.now.timestamp())

    other = OidcIssuer(env["oidc_issuer"], SeedBundle.generate().signing_key())
    forged, _ = other.mint(subject=ALICE, audience="prod-apiserver", groups=["platform-admin"],
                           ttl_seconds=60, request_id="x", now=datetime.now(UTC))
    with pytest.raises(Exception):  # noqa: B017 (jwcrypto raises several unrelated types)
        jwcrypto_jwt.JWT(jwt=forged, key=keyset, algs=["RS256"])
    with pytest.raises(Exception):  # noqa: B017 (jwcrypto raises several unrelated types)
        jwcrypto_jwt.JWT(jwt=minted.token, key=keyset, algs=["RS256"],
                         check_claims={"aud": "staging-apiserver"})


def test_slack_text_for_each_credential_event(env):
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="incident cleanup")
    b.review(BOB, cr.id, approve_it=True)
    b.fetch(ALICE, cr.id)
    texts = [slack_text(e) for e in env["audit"]]
    assert "alice@example.com requested AWS role platform-admin: incident cleanup" in texts[0]
    assert "bob@example.com approved alice@example.com's request" in texts[1]
    assert "alice@example.com fetched AWS role platform-admin" in texts[2]
    assert all(cr.id in t for t in texts)


def test_state_on_host_is_sealed(env):
    env["broker"].request(ALICE, kind="aws", name="platform-admin", reason="very secret reason")
    raw = env["state"].read_bytes() + (env["state"].with_name("state.db-wal").read_bytes()
                                      if env["state"].with_name("state.db-wal").exists() else b"")
    assert b"very secret reason" not in raw and ALICE.encode() not in raw
    assert os.path.getsize(env["state"]) > 0


def test_concurrent_reviews_and_fetches_end_consistent(env):
    import threading
    b = env["broker"]
    cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")
    results: list[str] = []

    def review(who: str) -> None:
        try:
            b.review(who, cr.id, approve_it=(who == BOB))
            results.append(f"{who}:ok")
        except Exception as e:  # one of the two must lose
            results.append(f"{who}:{type(e).__name__}")

    threads = [threading.Thread(target=review, args=(w,)) for w in (BOB, CAROL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.split(":")[1] for r in results) == ["RequestClosed", "ok"]
    final = env["make"]().get(BOB, cr.id).request
    assert final.state.value in ("approved", "rejected") and final.closed_by in (None, CAROL)
