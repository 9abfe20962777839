"""The broker's rules and state transitions, with no network of its own.

Requests are policy ``ApprovalRequest`` objects moved only by policy's pure lifecycle functions
(``open_request``, ``approve``, ``reject``, ``use``, ``expire``), so the broker applies exactly the
MPA rules the gateway applies: under ENGINEERS_WITH_APPROVAL any other engineer approves, nobody
approves their own request, BREAK_GLASS_ONLY needs an incident and another security on-call.
State lives in :class:`enclave_bridge.sealed.SealedRecords`; every change is audited.
"""
from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

from policy import (
    InvalidRequest,
    NotEligible,
    RequestState,
    Target,
    UnknownRequest,
    approve,
    eligible_approvers,
    expire,
    may_approve,
    open_request,
    reject,
    use,
)
from policy.audit import AuditEvent
from policy.text_limits import MAX_COMMENT, MAX_INCIDENT, check_length, check_reason

from ..credentials.k8s import OidcIssuer, token_ttl
from ..credentials.sts import AwsSession, StsMinter, session_duration
from ..sealed import SealedRecords
from .config import BrokerConfig
from .notify import AuditSink, notify_all
from .records import CredentialRequest, CredentialTarget

_PREFIX = "req/"


@dataclasses.dataclass(frozen=True)
class KubernetesToken:
    token: str
    expiration: datetime
    cluster: str
    server: str


def utcnow() -> datetime:
    return datetime.now(UTC)


class BrokerService:
    """Request, review, fetch, list and get credential requests."""

    def __init__(self, config: BrokerConfig, records: SealedRecords, *, audit: Sequence[AuditSink],
                 sts: StsMinter | None = None, oidc: OidcIssuer | None = None,
                 notifiers: Sequence[Callable[[AuditEvent], None]] = (),
                 clock: Callable[[], datetime] = utcnow) -> None:
        if not audit:
            raise ValueError("the broker needs at least one audit sink")
        if config.roles and sts is None:
            raise ValueError("AWS roles are configured but no STS client was given")
        if config.clusters and oidc is None:
            raise ValueError("Kubernetes clusters are configured but no OIDC issuer was given")
        self.config = config
        self._records = records
        self._grants = config.grant_set()
        self._audit = list(audit)
        self._notifiers = list(notifiers)
        self._sts = sts
        self._oidc = oidc
        self._now = clock
        self._lock = threading.RLock()

    # --- storage ------------------------------------------------------------------------
    def _load(self, request_id: str) -> CredentialRequest:
        try:
            data = self._records.get(_PREFIX + request_id)
        except KeyError:
            raise UnknownRequest(f"no credential request {request_id!r}") from None
        cr = CredentialRequest.from_json(data)
        expired = expire(cr.request, self._now())
        if expired is not cr.request:
            cr = dataclasses.replace(cr, request=expired)
            self._save(cr)
        return cr

    def _save(self, cr: CredentialRequest) -> None:
        self._records.put(_PREFIX + cr.id, cr.to_json())

    def _all(self) -> list[CredentialRequest]:
        return [self._load(rid[len(_PREFIX):]) for rid in self._records.ids() if rid.startswith(_PREFIX)]

    def _emit(self, kind: str, actor: str, cr: CredentialRequest, **detail: object) -> None:
        event = AuditEvent(kind=kind, actor=actor, at=self._now(), request_id=cr.id,
                           service=cr.request.service, method=cr.request.method,
                           outcome=cr.request.state.value, reason=cr.request.reason,
                           detail={"target": cr.target.describe(), "requester": cr.request.requester,
                                   "incident": cr.request.incident, "state_counter": self._records.head.counter,
                                   **detail})
        for sink in self._audit:
            sink(event)  # an audit failure fails the operation
        notify_all(self._notifiers, event)

    def _require_engineer(self, principal: str) -> None:
        if not self._grants.is_engineer(principal, self._now()):
            raise NotEligible(f"{principal} holds no engineer grant on this broker")

    # --- operations ---------------------------------------------------------------------
    def _target(self, kind: str, name: str, groups: Iterable[str], duration: int) -> CredentialTarget:
        if duration < 0 or duration > 3600:
            raise InvalidRequest(f"duration_seconds must be 0 (default) to 3600, got {duration}")
        if kind == "aws":
            if name not in self.config.roles:
                raise InvalidRequest(f"unknown AWS role {name!r}; this broker offers: "
                                     f"{', '.join(sorted(self.config.roles)) or 'none'}")
            if list(groups):
                raise InvalidRequest("groups only apply to Kubernetes requests")
            return CredentialTarget("aws", name, (), duration)
        if kind == "kubernetes":
            cluster = self.config.clusters.get(name)
            if cluster is None:
                raise InvalidRequest(f"unknown Kubernetes cluster {name!r}; this broker offers: "
                                     f"{', '.join(sorted(self.config.clusters)) or 'none'}")
            wanted = tuple(sorted(set(groups)))
            if not wanted:
                raise InvalidRequest(f"name the groups to act as on {name} (allowed: {', '.join(cluster.groups)})")
            extra = [g for g in wanted if g not in cluster.groups]
            if extra:
                raise InvalidRequest(f"groups {', '.join(extra)} are not offered on cluster {name} "
                                     f"(allowed: {', '.join(cluster.groups)})")
            return CredentialTarget("kubernetes", name, wanted, duration)
        raise InvalidRequest(f"unknown credential kind {kind!r}; expected aws or kubernetes")

    def _mode(self, target: CredentialTarget):
        if target.kind == "aws":
            return self.config.roles[target.name].mode
        return self.config.clusters[target.name].mode

    def request(self, principal: str, *, kind: str, name: str, groups: Iterable[str] = (),
                reason: str = "", incident: str | None = None, duration_seconds: int = 0) -> CredentialRequest:
        """Open a pending request. Raises ``PolicyError`` subclasses on refusal."""
        target = self._target(kind, name, groups, duration_seconds)
        check_reason(reason, self.config.min_reason_length, "these credentials")
        check_length("incident", incident, MAX_INCIDENT)
        now = self._now()
        with self._lock:
            approval_request = open_request(
                request_id=f"cr-{secrets.token_hex(6)}", requester=principal,
                target=Target(target.service, target.method), mode=self._mode(target), grants=self._grants,
                now=now, pending_ttl=timedelta(seconds=self.config.pending_ttl_seconds),
                approval_ttl=timedelta(seconds=self.config.approval_ttl_seconds), reason=reason,
                incident=incident, body_sha256=target.digest())
            cr = CredentialRequest(approval_request, target)
            self._save(cr)
            self._emit("credential.requested", principal, cr, duration_seconds=duration_seconds)
            return cr

    def review(self, principal: str, request_id: str, *, approve_it: bool, comment: str = "") -> CredentialRequest:
        """Approve or reject someone else's pending request."""
        check_length("comment", comment, MAX_COMMENT)
        now = self._now()
        with self._lock:
            cr = self._load(request_id)
            if approve_it:
                updated = approve(cr.request, principal, self._grants, now, comment)
            else:
                updated = reject(cr.request, principal, self._grants, now, comment)
            cr = dataclasses.replace(cr, request=updated)
            self._save(cr)
            if not approve_it:
                kind = "request.rejected"
            elif updated.state is RequestState.APPROVED:
                kind = "credential.approved"
            else:
                kind = "request.approval_recorded"
            self._emit(kind, principal, cr, comment=comment.strip(),
                       valid_until=updated.valid_until.isoformat() if updated.valid_until else None)
            return cr

    def fetch(self, principal: str, request_id: str) -> AwsSession | KubernetesToken:
        """Mint credentials for the requester's approved request."""
        now = self._now()
        with self._lock:
            cr = self._load(request_id)
            r = cr.request
            if principal != r.requester:
                raise NotEligible(f"only {r.requester} can fetch credentials for request {r.id}")
            used = use(r, now)  # refuses anything not approved, expired or used up
            remaining = (r.valid_until - now).total_seconds() if r.valid_until else 0
            approvers = list(r.approvers)
            if cr.target.kind == "aws":
                role = self.config.roles[cr.target.name]
                duration = session_duration(cr.target.duration_seconds or None, remaining, role.max_duration)
                assert self._sts is not None
                minted: AwsSession | KubernetesToken = self._sts.mint(
                    role_arn=role.arn, engineer=r.requester, approvers=approvers, request_id=r.id,
                    duration_seconds=duration)
                detail = {"role_arn": role.arn, "duration_seconds": duration,
                          "expires_at": minted.expiration.isoformat(), "source_identity": r.requester}
            else:
                cluster = self.config.clusters[cr.target.name]
                ttl = token_ttl(cr.target.duration_seconds or None, remaining, cluster.max_duration)
                assert self._oidc is not None
                token, exp = self._oidc.mint(subject=r.requester, audience=cluster.audience,
                                             groups=cr.target.groups, ttl_seconds=ttl, request_id=r.id, now=now)
                minted = KubernetesToken(token, exp, cluster.name, cluster.server)
                detail = {"cluster": cluster.name, "groups": list(cr.target.groups),
                          "duration_seconds": ttl, "expires_at": exp.isoformat()}
            cr = dataclasses.replace(cr, request=used)
            self._save(cr)
            self._emit("credential.fetched", principal, cr, fetch=used.uses, **detail)
            return minted

    def counts(self) -> dict[tuple[str, str], int]:
        """How many requests the sealed state holds, by (kind, state) (for metrics)."""
        with self._lock:
            out: dict[tuple[str, str], int] = {}
            for cr in self._all():
                key = (cr.target.kind, cr.request.state.value)
                out[key] = out.get(key, 0) + 1
            return out

    def get(self, principal: str, request_id: str) -> CredentialRequest:
        self._require_engineer(principal)
        with self._lock:
            return self._load(request_id)

    def eligible(self, cr: CredentialRequest) -> tuple[str, ...]:
        """Who may still approve ``cr`` now under this broker's grants (policy's routing: the
        mode's approver role, not the requester, not already approving); empty once closed."""
        if cr.request.state is not RequestState.PENDING:
            return ()
        return eligible_approvers(cr.request, self._grants, self._now())

    def list(self, principal: str, *, mine: bool = False, reviewable: bool = False,
             states: Sequence[RequestState] = (), limit: int = 100) -> list[CredentialRequest]:
        """Requests visible to an engineer, newest first."""
        self._require_engineer(principal)
        now = self._now()
        with self._lock:
            out = []
            for cr in self._all():
                r = cr.request
                if mine and r.requester != principal:
                    continue
                if reviewable and not (r.state is RequestState.PENDING and may_approve(principal, r, self._grants, now)):
                    continue
                if states and r.state not in states:
                    continue
                out.append(cr)
        out.sort(key=lambda c: (c.request.created_at, c.id), reverse=True)
        return out[:max(1, min(limit or 100, 1000))]
