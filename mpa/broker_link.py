"""The approvals server's view of the credential broker, for the web inbox and credential pages.

The server holds no broker authority of its own: every call forwards the signed-in engineer's
token, so the broker (inside the enclave) applies its own rules to exactly that person. The
connection pins the broker's certificate, as ``mpa``'s broker commands do.
"""
from __future__ import annotations

import dataclasses
import pathlib
from datetime import UTC, datetime
from typing import Any

import grpc

from enclave_bridge.broker.client import BrokerClient
from mpa.v1 import broker_pb2
from policy import Mode

from .service import APPROVER_WORDS, MODE_EXPLANATIONS, shortfall_note

STATE_NAMES = {v: k.removeprefix("REQUEST_STATE_").lower()
               for k, v in broker_pb2.RequestState.items()}


class BrokerRefused(Exception):
    """The broker said no (or could not be reached); ``status`` is the page's HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403,
           grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.FAILED_PRECONDITION: 409,
           grpc.StatusCode.INVALID_ARGUMENT: 422}


@dataclasses.dataclass(frozen=True)
class CredentialApproval:
    approver: str
    at: datetime | None
    comment: str


@dataclasses.dataclass(frozen=True)
class CredentialView:
    """One credential request as the broker reported it to the signed-in engineer."""

    id: str
    requester: str
    kind: str            # "aws" or "kubernetes"
    what: str            # "AWS role platform-admin", "Kubernetes cluster prod as groups: ops"
    reason: str
    incident: str
    state: str
    mode: str
    approvals: tuple[CredentialApproval, ...]
    created_at: datetime | None
    expires_at: datetime | None
    valid_until: datetime | None
    duration_seconds: int
    closed_by: str
    close_reason: str
    fetches: int
    #: Who may approve it now under the broker's grants; None when the broker did not say.
    eligible: tuple[str, ...] | None = None
    required_approvals: int = 1

    @property
    def approver_rule(self) -> str:
        """Who may approve, by the request's mode."""
        return approver_rule(self.mode)

    @property
    def routing_note(self) -> str:
        """The warning the requester must hear when too few people can approve (else "")."""
        if self.state != "pending" or self.eligible is None:
            return ""
        return shortfall_note(self.approver_rule, self.required_approvals - len(self.approvals),
                              self.eligible, grant_hint="the credential broker's `grants`")

    @classmethod
    def from_proto(cls, m: Any) -> CredentialView:
        def ts(field: str) -> datetime | None:
            if not m.HasField(field):
                return None
            return getattr(m, field).ToDatetime(tzinfo=UTC)
        if m.HasField("aws"):
            kind, what = "aws", f"AWS role {m.aws.role}"
        else:
            kind = "kubernetes"
            what = f"Kubernetes cluster {m.kubernetes.cluster} as groups: {', '.join(m.kubernetes.groups)}"
        return cls(
            id=m.id, requester=m.requester, kind=kind, what=what, reason=m.reason,
            incident=m.incident, state=STATE_NAMES.get(m.state, "unknown"), mode=m.mode,
            approvals=tuple(CredentialApproval(a.approver, a.at.ToDatetime(
                tzinfo=UTC) if a.HasField("at") else None, a.comment)
                for a in m.approvals),
            created_at=ts("created_at"), expires_at=ts("expires_at"),
            valid_until=ts("valid_until"), duration_seconds=m.duration_seconds,
            closed_by=m.closed_by, close_reason=m.close_reason, fetches=m.fetches,
            eligible=tuple(m.routing.eligible_approvers) if m.HasField("routing") else None,
            required_approvals=max(1, m.routing.required_approvals))


def approver_rule(mode_name: str) -> str:
    """Who may approve a credential request under ``mode_name``, in the approval page's words."""
    try:
        words = APPROVER_WORDS.get(Mode[mode_name])
    except KeyError:
        return "decided by the broker"
    return words.format(service="the broker's target") if words else "nobody (no approval mode)"


def mode_explanation(mode_name: str) -> str:
    """Why a credential request under ``mode_name`` needs approval."""
    try:
        return MODE_EXPLANATIONS.get(Mode[mode_name], mode_name)
    except KeyError:
        return mode_name


@dataclasses.dataclass(frozen=True)
class BrokerLink:
    """Where the broker listens (``host:port``), its certificate (pinned) and TLS name."""

    target: str
    cert_pem: bytes
    server_name: str = "broker.mpa.internal"
    timeout: float = 10.0

    @classmethod
    def from_files(cls, target: str, cert_path: str | pathlib.Path,
                   server_name: str = "broker.mpa.internal") -> BrokerLink:
        """Read the pinned certificate; a missing or non-PEM file is an error at start."""
        try:
            pem = pathlib.Path(cert_path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the broker certificate {cert_path}: {e.strerror}") from None
        if b"BEGIN CERTIFICATE" not in pem:
            raise ValueError(f"the broker certificate {cert_path} is not PEM")
        return cls(target, pem, server_name)

    def _call(self, token: str, fn: str, *args: Any, **kw: Any) -> Any:
        client = BrokerClient(self.target, self.cert_pem, token, server_name=self.server_name,
                              timeout=self.timeout)
        try:
            return getattr(client, fn)(*args, **kw)
        except grpc.RpcError as e:
            code = e.code() or grpc.StatusCode.UNKNOWN
            status = _STATUS.get(code, 503)
            words = e.details() or code.name.lower()
            if status == 503:
                words = f"the credential broker at {self.target} is unavailable ({words})"
            raise BrokerRefused(status, words) from None
        finally:
            client.close()

    def mine(self, token: str) -> list[CredentialView]:
        return [CredentialView.from_proto(m) for m in self._call(token, "list", mine=True)]

    def reviewable(self, token: str) -> list[CredentialView]:
        return [CredentialView.from_proto(m) for m in self._call(token, "list", reviewable=True)]

    def get(self, token: str, request_id: str) -> CredentialView:
        return CredentialView.from_proto(self._call(token, "get", request_id))

    def review(self, token: str, request_id: str, *, approve: bool, comment: str = "") -> None:
        self._call(token, "review", request_id, approve=approve, comment=comment)


__all__ = ["BrokerLink", "BrokerRefused", "CredentialApproval", "CredentialView", "approver_rule",
           "mode_explanation"]
