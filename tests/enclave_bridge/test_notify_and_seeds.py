"""Audit log and Slack notifications for credential events; seed bundles opened only through KMS."""
from __future__ import annotations

import base64
import json

import pytest

from devstack.devissuer import DevIssuer
from enclave_bridge.broker.notify import BrokerSlack, JsonlAuditLog
from enclave_bridge.broker.service import BrokerService
from enclave_bridge.credentials.k8s import OidcIssuer
from enclave_bridge.credentials.sts import StsMinter
from enclave_bridge.kms import KeyPolicy, KmsAccessDenied, LocalKms
from enclave_bridge.sealed import SealedRecords, SqliteHostStorage
from enclave_bridge.seeds import SeedBundle, SeedError, open_bundle, seal_bundle
from tests.support.enclave_broker_attest import GOOD_PCRS, make_nsm, verifier_for
from tests.support.enclave_broker_env import StubSts, broker_config
from tests.support.enclave_broker_slack import SlackStub, wait_for

ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture
def parts(tmp_path):
    sts, slack = StubSts(), SlackStub()
    dev = DevIssuer()
    config = broker_config(dev.jwks(), issuer=dev.issuer, audience=dev.audience, oidc_issuer="http://127.0.0.1:1")
    seeds = SeedBundle.generate()
    try:
        yield {"sts": sts, "slack": slack, "config": config, "seeds": seeds, "tmp": tmp_path}
    finally:
        sts.close()
        slack.close()


def make(parts, audit, notifiers=()):
    return BrokerService(parts["config"], SealedRecords(SqliteHostStorage(parts["tmp"] / "s.db"), parts["seeds"].state_key),
                         audit=audit, sts=StsMinter(parts["sts"].client()),
                         oidc=OidcIssuer("http://127.0.0.1:1", parts["seeds"].signing_key()), notifiers=notifiers)


def test_every_credential_event_is_audited_and_posted_to_slack(parts):
    log = JsonlAuditLog(parts["tmp"] / "audit.jsonl")
    slack = BrokerSlack(parts["slack"].url, parts["tmp"] / "slack.db", poll=0.05).start()
    try:
        b = make(parts, [log], [slack.notifier])
        cr = b.request(ALICE, kind="aws", name="platform-admin", reason="rotate keys <!channel>")
        b.review(BOB, cr.id, approve_it=True)
        b.fetch(ALICE, cr.id)
        assert wait_for(lambda: len(parts["slack"].posts) >= 3)
    finally:
        slack.close()
    lines = [json.loads(x) for x in (parts["tmp"] / "audit.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["actor"], e["request_id"]) for e in lines] == [
        ("credential.requested", ALICE, cr.id), ("credential.approved", BOB, cr.id),
        ("credential.fetched", ALICE, cr.id)]
    assert all("secret" not in json.dumps(e).lower() for e in lines)
    posts = parts["slack"].posts
    assert len(posts) == 3 and all(p["type"] == "application/json" and p["path"] == "/services/T0/B0/xyz" for p in posts)
    assert "requested AWS role platform-admin" in posts[0]["json"]["text"]
    assert "&lt;!channel&gt;" in posts[0]["json"]["text"]  # requester text cannot ping the channel
    assert "approved" in posts[1]["json"]["text"] and "fetched" in posts[2]["json"]["text"]
    # Block Kit like the approvals service's: a header, the event, fields, the reason, the request.
    blocks = posts[0]["json"]["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "section", "section", "context"]
    assert blocks[0]["text"] == {"type": "plain_text", "text": "Credentials requested"}
    assert {"type": "mrkdwn", "text": f"*Requester*\n{ALICE}"} in blocks[2]["fields"]
    assert blocks[3]["text"]["text"] == "*Reason*\n>rotate keys &lt;!channel&gt;"
    assert cr.id in blocks[4]["elements"][0]["text"]
    assert posts[2]["json"]["blocks"][0]["text"]["text"] == "Credentials fetched"
    assert any("Valid until" in f["text"] for f in posts[2]["json"]["blocks"][2]["fields"])


def test_slack_outage_does_not_block_but_audit_failure_does(parts):
    parts["slack"].close()
    broken_slack = BrokerSlack(parts["slack"].url, parts["tmp"] / "slack.db", timeout=1, poll=0.05).start()
    audit = []
    b = make(parts, [audit.append], [broken_slack.notifier])
    try:
        cr = b.request(ALICE, kind="aws", name="platform-admin", reason="read the NAT gateway flow logs")  # Slack down: still works
        b.review(BOB, cr.id, approve_it=True)
        assert broken_slack.spool.counts() == {"pending": 2, "delivered": 0}  # kept for retry
    finally:
        broken_slack.close()

    def failing(event):
        raise OSError("audit disk full")

    b2 = make(parts, [failing])
    with pytest.raises(OSError, match="audit disk full"):
        b2.fetch(ALICE, cr.id)
    assert parts["sts"].requests and [e.kind for e in audit][-1] == "credential.approved"  # no fetched event, no creds returned


def test_seed_bundle_opens_only_in_a_measured_enclave():
    nsm = make_nsm()
    kms = LocalKms(verifier_for(nsm))
    key_id = kms.create_key(KeyPolicy.for_pcrs({0: GOOD_PCRS[0]}))
    seeds = SeedBundle.generate(slack_webhook_url="https://hooks.slack.com/services/x")
    sealed = seal_bundle(seeds, key_id, lambda pt, ctx: kms.encrypt(key_id, pt, ctx))
    assert seeds.state_key not in sealed and b"PRIVATE KEY" not in sealed
    opened = open_bundle(sealed, kms, nsm)
    assert opened == seeds and "slack=<set>" in repr(opened) and "PRIVATE" not in repr(opened)

    other = make_nsm({0: b"\x01" * 48}, like=nsm)
    with pytest.raises(KmsAccessDenied):
        open_bundle(sealed, kms, other)

    doc = json.loads(sealed)
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[5] ^= 1
    doc["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    with pytest.raises(SeedError, match="does not authenticate"):
        open_bundle(json.dumps(doc).encode(), kms, nsm)
    with pytest.raises(SeedError, match="not a seed bundle"):
        open_bundle(b"{}", kms, nsm)
    with pytest.raises(SeedError, match="malformed"):
        open_bundle(b"not json", kms, nsm)
