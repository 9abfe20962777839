"""Approval receipts: the approvals service's signed statement that a request was approved.

A receipt is a JWT signed with the service's Ed25519 receipt key (config ``receipt_key_path``,
PEM PKCS#8). A party that does not share the store (the enclave broker accepting a change of
its trusted measurement, see :mod:`enclave_bridge.trust`) pins the public half and checks the
receipt itself. Claims: ``typ`` (``mpa-approval-receipt``), ``jti`` (request id), ``service``,
``method``, ``body_sha256``, ``mode``, ``requester``, ``approvers``, ``incident``, ``iat`` (when
it was approved), ``exp`` (the approval's ``valid_until``).
"""
from __future__ import annotations

from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, Field

from enclave_bridge.trust import RECEIPT_TYPE
from policy import ApprovalRequest, RequestState


class ReceiptUnavailable(Exception):
    """No receipt: the request is not approved, or this server has no receipt key."""


class ReceiptOut(BaseModel):
    """A signed receipt for an approved request."""

    receipt: str = Field(description="JWT (EdDSA) signed with the approvals service's receipt key")
    public_key: str = Field(description="the receipt key's public half (PEM), to pin")


def load_receipt_key(path: str | Path) -> Ed25519PrivateKey:
    """Read the Ed25519 receipt key (PEM PKCS#8); the error names the file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"receipt_key_path {path}: not a readable PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"receipt_key_path {path}: the receipt key must be Ed25519")
    return key


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign_receipt(r: ApprovalRequest, key: Ed25519PrivateKey) -> str:
    """The receipt for approved request ``r``; raises :class:`ReceiptUnavailable` otherwise."""
    if r.state is not RequestState.APPROVED or r.valid_until is None or not r.approvals:
        raise ReceiptUnavailable(f"request {r.id} is {r.state.value}, not approved: no receipt")
    approved_at = max(a.at for a in r.approvals)
    claims = {"typ": RECEIPT_TYPE, "jti": r.id, "service": r.service, "method": r.method,
              "body_sha256": r.body_sha256, "mode": r.mode.name, "requester": r.requester,
              "approvers": list(r.approvers), "incident": r.incident,
              "iat": int(approved_at.timestamp()), "exp": int(r.valid_until.timestamp())}
    return jwt.encode(claims, key, algorithm="EdDSA")
