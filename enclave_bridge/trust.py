"""Two-person changes of the broker's trusted measurement, verified by the broker itself.

A change is an ordinary MPA request in the approvals service for the fixed target
``/rpcauthz.enclave.v1.BrokerMeasurement/Trust`` (mode :data:`TRUST_MODE`, BREAK_GLASS_ONLY:
the proposer is a security on-call engineer with a change reference, the approver *another*
security on-call engineer), bound by ``body_sha256`` to exactly one (commit, SHA-384) pair
(:func:`change_digest`). Both people sign in with their usual tokens; the approvals service
applies its usual rules and audits every step.

Once approved, the approvals service issues a **receipt**: a JWT (EdDSA, Ed25519) over the
request's target, digest, requester, approvers and validity, signed with the service's receipt
key (see :mod:`mpa.receipts`). The broker pins that key's public half and
:func:`verify_trust_receipt` re-checks everything on its own: the signature, the target, the
digest of the measurement it is asked to trust, that the requester did not approve, and that an
approver is security on-call and the requester an engineer *in the broker's own grants*. A
receipt signed by anything else, for another measurement, or approved by the proposer alone is
refused with :class:`TrustChangeRefused` naming why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policy import GrantSet, Mode, Role

from .measure import COMMIT_HEX, SHA384_HEX

TRUST_SERVICE = "rpcauthz.enclave.v1.BrokerMeasurement"
TRUST_METHOD = "Trust"
TRUST_MODE = Mode.BREAK_GLASS_ONLY
RECEIPT_TYPE = "mpa-approval-receipt"


class TrustChangeRefused(Exception):
    """The measurement change is not backed by a valid two-person approval; the message says why."""


def change_digest(commit: str, sha384: str) -> str:
    """The ``body_sha256`` an approval of trusting ``sha384`` (built from ``commit``) is bound to."""
    if not COMMIT_HEX.fullmatch(commit):
        raise ValueError(f"commit must be 40 lowercase hex characters, got {commit!r}")
    if not SHA384_HEX.fullmatch(sha384):
        raise ValueError(f"sha384 must be 96 lowercase hex characters, got {sha384!r}")
    body = json.dumps({"commit": commit, "sha384": sha384, "target": f"/{TRUST_SERVICE}/{TRUST_METHOD}"},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """The approvals service's receipt public key (PEM SubjectPublicKeyInfo, Ed25519)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"the approvals receipt key is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the approvals receipt key must be Ed25519")
    return key


@dataclasses.dataclass(frozen=True)
class TrustApproval:
    """A verified approval to trust ``sha384``."""

    request_id: str
    commit: str
    sha384: str
    requester: str
    approvers: tuple[str, ...]
    approved_at: datetime


def verify_trust_receipt(receipt: str, *, public_key: Ed25519PublicKey, grants: GrantSet, commit: str,
                         sha384: str, now: datetime | None = None) -> TrustApproval:
    """Check ``receipt`` approves trusting ``sha384`` from ``commit``; raise :class:`TrustChangeRefused`.

    ``grants`` are the broker's own (its configuration, itself part of the measurement): the
    approvals service's word on who is security on-call is not taken on trust; they are checked
    as of the approval. ``now``, when given (accepting a change), must fall in the receipt's
    validity window; a broker re-checking the change it runs under passes None (the approval
    happened; it does not expire once acted on).
    """
    try:
        claims: dict[str, Any] = jwt.decode(
            receipt, key=public_key, algorithms=["EdDSA"],
            options={"require": ["iat", "exp", "jti", "typ", "service", "method", "body_sha256",
                                 "mode", "requester", "approvers"], "verify_exp": False, "verify_iat": False})
    except jwt.InvalidSignatureError:
        raise TrustChangeRefused("the approval receipt's signature is not the approvals service's "
                                 "(pinned receipt key)") from None
    except jwt.PyJWTError as e:
        raise TrustChangeRefused(f"the approval receipt is not a valid receipt: {e}") from None
    if claims["typ"] != RECEIPT_TYPE:
        raise TrustChangeRefused(f"the token is a {claims['typ']!r}, not an approval receipt")
    if (claims["service"], claims["method"]) != (TRUST_SERVICE, TRUST_METHOD):
        raise TrustChangeRefused(f"the receipt approves /{claims['service']}/{claims['method']}, "
                                 f"not a change of the trusted measurement (/{TRUST_SERVICE}/{TRUST_METHOD})")
    if claims["mode"] != TRUST_MODE.name:
        raise TrustChangeRefused(f"the receipt's request was decided under {claims['mode']}, not {TRUST_MODE.name}")
    if claims["body_sha256"] != change_digest(commit, sha384):
        raise TrustChangeRefused(f"the receipt approves another measurement, not {sha384[:16]}... from "
                                 f"commit {commit[:12]}")
    if now is not None and not claims["iat"] - 60 <= now.timestamp() < claims["exp"]:
        raise TrustChangeRefused("the approval receipt is outside its validity window (expired or not yet valid)")
    approved_at = datetime.fromtimestamp(claims["iat"], UTC)
    requester = str(claims["requester"])
    approvers = tuple(str(a) for a in claims["approvers"] or ())
    others = [a for a in approvers if a != requester]
    if not others:
        raise TrustChangeRefused(f"nobody but the proposer {requester} approved: one person cannot change "
                                 "the trusted measurement")
    if not grants.is_engineer(requester, approved_at):
        raise TrustChangeRefused(f"the proposer {requester} holds no engineer grant on this broker")
    oncall = [a for a in others if grants.has(a, Role.SECURITY_ONCALL, approved_at)]
    if not oncall:
        raise TrustChangeRefused(f"no approver ({', '.join(others)}) is security on-call in this broker's grants")
    return TrustApproval(str(claims["jti"]), commit, sha384, requester, tuple(oncall), approved_at)
