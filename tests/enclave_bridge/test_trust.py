"""The broker's own check of a measurement change: the approvals service's signed receipt, verified
against the pinned receipt key and the broker's own grants (policy lifecycle + mpa.receipts signer)."""
from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.trust import (
    TRUST_METHOD,
    TRUST_MODE,
    TRUST_SERVICE,
    TrustChangeRefused,
    change_digest,
    verify_trust_receipt,
)
from mpa.receipts import ReceiptUnavailable, sign_receipt
from policy import Approval, Grant, GrantSet, Mode, Role, Target, approve, open_request

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
COMMIT, SHA = "0123456789abcdef0123456789abcdef01234567", "ab" * 48
DEV, SAM, SUE, BOB = "dev@example.com", "sam@example.com", "sue@example.com", "bob@example.com"
GRANTS = GrantSet([Grant(p, Role.ENGINEER) for p in (DEV, SAM, SUE, BOB)]
                  + [Grant(p, Role.SECURITY_ONCALL) for p in (DEV, SAM, SUE)])
KEY = Ed25519PrivateKey.generate()


def approved(*, approver: str = SAM, digest: str | None = None, target=(TRUST_SERVICE, TRUST_METHOD),
             mode: Mode = TRUST_MODE):
    r = open_request(request_id="req-1", requester=DEV, target=Target(*target), mode=mode, grants=GRANTS, now=NOW,
                     reason="release 1.5", incident="CHG-7", body_sha256=digest or change_digest(COMMIT, SHA))
    return approve(r, approver, GRANTS, NOW + timedelta(minutes=1))


def check(receipt: str, **kw):
    args = dict(public_key=KEY.public_key(), grants=GRANTS, commit=COMMIT, sha384=SHA,
                now=NOW + timedelta(minutes=2))
    args.update(kw)
    return verify_trust_receipt(receipt, **args)


def test_a_second_security_oncall_approval_is_accepted():
    ok = check(sign_receipt(approved(), KEY))
    assert ok.requester == DEV and ok.approvers == (SAM,) and ok.request_id == "req-1" and ok.sha384 == SHA
    # Re-checked later by the broker (no validity window: the change was made).
    assert check(sign_receipt(approved(), KEY), now=None).approvers == (SAM,)


def test_one_person_cannot_make_the_change_even_with_a_receipt_that_says_so():
    # The approvals service refuses self-approval; a receipt claiming it (a compromised or buggy
    # service) is still refused by the broker's own check.
    r = dataclasses.replace(approved(), approvals=(Approval(DEV, NOW + timedelta(minutes=1), ""),))
    with pytest.raises(TrustChangeRefused, match="one person cannot change"):
        check(sign_receipt(r, KEY))


def test_an_approver_who_is_not_security_oncall_in_the_brokers_grants_is_refused():
    r = dataclasses.replace(approved(), approvals=(Approval(BOB, NOW + timedelta(minutes=1), ""),))
    with pytest.raises(TrustChangeRefused, match="security on-call in this broker's grants"):
        check(sign_receipt(r, KEY))
    without_sam = GrantSet([Grant(p, Role.ENGINEER) for p in (DEV, SAM, SUE)] + [Grant(DEV, Role.SECURITY_ONCALL)])
    with pytest.raises(TrustChangeRefused, match="security on-call"):
        check(sign_receipt(approved(), KEY), grants=without_sam)


def test_a_receipt_signed_by_another_key_is_refused():
    with pytest.raises(TrustChangeRefused, match="signature is not the approvals service's"):
        check(sign_receipt(approved(), Ed25519PrivateKey.generate()))


def test_a_receipt_for_another_measurement_or_target_is_refused():
    with pytest.raises(TrustChangeRefused, match="another measurement"):
        check(sign_receipt(approved(), KEY), sha384="cd" * 48)
    other = approved(target=("demo.v1.Ledger", "Wipe"))
    with pytest.raises(TrustChangeRefused, match="not a change of the trusted measurement"):
        check(sign_receipt(other, KEY))
    with pytest.raises(TrustChangeRefused, match="decided under ENGINEERS_WITH_APPROVAL"):
        check(sign_receipt(approved(approver=BOB, mode=Mode.ENGINEERS_WITH_APPROVAL), KEY))


def test_accepting_needs_the_receipt_inside_its_validity_and_an_approved_request():
    with pytest.raises(TrustChangeRefused, match="validity window"):
        check(sign_receipt(approved(), KEY), now=NOW + timedelta(hours=3))
    with pytest.raises(TrustChangeRefused, match="not a valid receipt"):
        check("not.a.jwt")
    pending = open_request(request_id="req-2", requester=DEV, target=Target(TRUST_SERVICE, TRUST_METHOD),
                           mode=TRUST_MODE, grants=GRANTS, now=NOW, reason="r", incident="CHG-7",
                           body_sha256=change_digest(COMMIT, SHA))
    with pytest.raises(ReceiptUnavailable, match="not approved"):
        sign_receipt(pending, KEY)


@pytest.mark.parametrize("commit, sha384, words", [
    (COMMIT + "\n", SHA, "commit must be 40 lowercase hex"),
    (COMMIT, SHA + "\n", "sha384 must be 96 lowercase hex"),
    (COMMIT.upper(), SHA, "commit must be 40 lowercase hex"),
])
def test_a_trust_change_names_exactly_one_commit_and_measurement(commit, sha384, words, tmp_path):
    """Neither the approval's digest nor the ledger takes a value with anything around its
    hex (a trailing newline passed a "$"-anchored check)."""
    from enclave_bridge.measure import TrustLedger

    with pytest.raises(ValueError, match=words):
        change_digest(commit, sha384)
    with pytest.raises(ValueError, match="needs a 40-hex commit and a 96-hex sha384"):
        TrustLedger(tmp_path / "ledger.json").accept({"commit": commit, "sha384": sha384, "request_id": "r",
                                                      "receipt": "x"})
    assert not (tmp_path / "ledger.json").exists()
