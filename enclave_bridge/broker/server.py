"""The broker's gRPC API (``mpa.v1.CredentialBroker``) over TLS, and the process that runs it.

Start-up inside the enclave (:func:`start_broker`):

1. open the seed bundle through KMS with an attestation document (:mod:`enclave_bridge.seeds`);
2. open the sealed state on the host with the seed ``state_key`` (:mod:`enclave_bridge.sealed`);
3. make a TLS key and certificate in memory (:mod:`.tls`);
4. serve the API, and the Kubernetes issuer's discovery document and JWKS.

Every call must carry ``authorization: Bearer <JWT>`` from the configured issuer; the token's
subject is the engineer. Policy refusals map to gRPC codes with the reason as the message.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from mpa.v1 import broker_pb2, broker_pb2_grpc
from policy import (
    AlreadyDecided,
    InvalidRequest,
    NotEligible,
    PolicyError,
    RequestClosed,
    RequestExpired,
    RequestState,
    SelfApproval,
    UnknownRequest,
)

from ..credentials.k8s import OidcIssuer, OidcServer
from ..credentials.sts import AwsSession, StsError, StsMinter
from ..sealed import SealedRecords, SealedStateError, SqliteHostStorage
from ..seeds import SeedBundle
from .config import BrokerConfig, Identity
from .metrics import BrokerMetrics
from .notify import AuditSink
from .records import CredentialRequest
from .service import BrokerService, KubernetesToken
from .tls import TlsIdentity, attest_certificate, make_tls_identity

log = logging.getLogger(__name__)

_STATES = {
    RequestState.PENDING: broker_pb2.REQUEST_STATE_PENDING,
    RequestState.APPROVED: broker_pb2.REQUEST_STATE_APPROVED,
    RequestState.REJECTED: broker_pb2.REQUEST_STATE_REJECTED,
    RequestState.CANCELLED: broker_pb2.REQUEST_STATE_CANCELLED,
    RequestState.EXPIRED: broker_pb2.REQUEST_STATE_EXPIRED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


class Unauthenticated(Exception):
    pass


class Authenticator:
    """Verifies the caller's bearer JWT against the configured issuer keys."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(dict(identity.jwks)).keys}

    def principal(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        header = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(header, str) or not header.lower().startswith("bearer "):
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata; run `mpa login`")
        token = header[7:].strip()
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(kid) if kid else (next(iter(self._keys.values())) if len(self._keys) == 1 else None)
            if key is None:
                raise Unauthenticated(f"token signed with unknown key id {kid!r}")
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name],
                                audience=self._identity.audience, issuer=self._identity.issuer,
                                options={"require": ["exp", "iss", "aud", self._identity.principal_claim]})
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"token refused: {e}") from None
        principal = claims.get(self._identity.principal_claim)
        if not isinstance(principal, str) or not principal:
            raise Unauthenticated(f"token has no {self._identity.principal_claim} claim")
        return principal


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    t = Timestamp()
    t.FromDatetime(value)
    return t


def to_proto(cr: CredentialRequest, eligible: Sequence[str] | None = None) -> broker_pb2.CredentialRequest:
    """The wire form of ``cr``; ``eligible`` (who may approve it now) fills its ``routing``."""
    r = cr.request
    msg = broker_pb2.CredentialRequest(
        id=r.id, requester=r.requester, reason=r.reason, incident=r.incident or "",
        state=_STATES[r.state], mode=r.mode.name, duration_seconds=cr.target.duration_seconds,
        closed_by=r.closed_by or "", close_reason=r.close_reason, fetches=r.uses,
        approvals=[broker_pb2.Approval(approver=a.approver, at=_ts(a.at), comment=a.comment) for a in r.approvals],
        created_at=_ts(r.created_at), expires_at=_ts(r.expires_at))
    if r.valid_until:
        msg.valid_until.FromDatetime(r.valid_until)
    if cr.target.kind == "aws":
        msg.aws.role = cr.target.name
    else:
        msg.kubernetes.cluster = cr.target.name
        msg.kubernetes.groups.extend(cr.target.groups)
    if eligible is not None:
        msg.routing.eligible_approvers.extend(eligible)
        msg.routing.required_approvals = r.required_approvals
    return msg


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (SelfApproval, grpc.StatusCode.PERMISSION_DENIED),
    (NotEligible, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyDecided, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestClosed, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestExpired, grpc.StatusCode.FAILED_PRECONDITION),
    (PolicyError, grpc.StatusCode.PERMISSION_DENIED),
    (UnknownRequest, grpc.StatusCode.NOT_FOUND),
    (StsError, grpc.StatusCode.UNAVAILABLE),
    (SealedStateError, grpc.StatusCode.DATA_LOSS),
]


class BrokerServicer(broker_pb2_grpc.CredentialBrokerServicer):
    def __init__(self, service: BrokerService, auth: Authenticator,
                 metrics: BrokerMetrics | None = None) -> None:
        self._service = service
        self._auth = auth
        self._metrics = metrics

    def _out(self, cr: CredentialRequest) -> broker_pb2.CredentialRequest:
        return to_proto(cr, self._service.eligible(cr))

    def _call(self, context: grpc.ServicerContext, fn: Callable[[str], Any], operation: str) -> Any:
        try:
            return fn(self._auth.principal(context.invocation_metadata()))
        except tuple(c for c, _ in _CODES) as e:
            code = next(code for cls, code in _CODES if isinstance(e, cls))
            if self._metrics is not None:
                self._metrics.refused(operation, e)
            if code is grpc.StatusCode.DATA_LOSS:
                log.error("sealed state refused: %s", e)
            context.abort(code, str(e).replace("\n", " ") or type(e).__name__)
        except Exception:
            log.exception("broker call failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the broker; see its log")

    def Request(self, request, context):  # noqa: N802 (gRPC names)
        def run(principal: str):
            which = request.WhichOneof("target")
            if which == "aws":
                kind, name, groups = "aws", request.aws.role, ()
            elif which == "kubernetes":
                kind, name, groups = "kubernetes", request.kubernetes.cluster, tuple(request.kubernetes.groups)
            else:
                raise InvalidRequest("say what the credentials are for: aws or kubernetes")
            return self._out(self._service.request(principal, kind=kind, name=name, groups=groups,
                                                  reason=request.reason, incident=request.incident or None,
                                                  duration_seconds=request.duration_seconds))
        return self._call(context, run, "Request")

    def Review(self, request, context):  # noqa: N802
        def run(principal: str):
            if request.verdict == broker_pb2.ReviewRequest.VERDICT_APPROVE:
                approve_it = True
            elif request.verdict == broker_pb2.ReviewRequest.VERDICT_REJECT:
                approve_it = False
            else:
                raise InvalidRequest("verdict must be APPROVE or REJECT")
            return self._out(self._service.review(principal, request.id, approve_it=approve_it,
                                                 comment=request.comment))
        return self._call(context, run, "Review")

    def Fetch(self, request, context):  # noqa: N802
        def run(principal: str):
            minted = self._service.fetch(principal, request.id)
            if isinstance(minted, AwsSession):
                return broker_pb2.FetchResponse(aws=broker_pb2.AwsCredentials(
                    access_key_id=minted.access_key_id, secret_access_key=minted.secret_access_key,
                    session_token=minted.session_token, expiration=_ts(minted.expiration),
                    role_arn=minted.role_arn, region=self._service.config.aws_region))
            assert isinstance(minted, KubernetesToken)
            return broker_pb2.FetchResponse(kubernetes=broker_pb2.KubernetesCredentials(
                token=minted.token, expiration=_ts(minted.expiration), cluster=minted.cluster,
                server=minted.server))
        return self._call(context, run, "Fetch")

    def List(self, request, context):  # noqa: N802
        def run(principal: str):
            states = [_STATES_BACK[s] for s in request.states if s in _STATES_BACK]
            found = self._service.list(principal, mine=request.mine, reviewable=request.reviewable,
                                       states=states, limit=request.limit or 100)
            return broker_pb2.ListResponse(requests=[self._out(cr) for cr in found])
        return self._call(context, run, "List")

    def Get(self, request, context):  # noqa: N802
        return self._call(context, lambda principal: self._out(self._service.get(principal, request.id)),
                          "Get")


class BrokerServer:
    """The gRPC server with the in-enclave TLS identity. ``start()`` returns the bound port."""

    def __init__(self, service: BrokerService, tls: TlsIdentity, *, max_workers: int = 8,
                 metrics: BrokerMetrics | None = None) -> None:
        self.service = service
        self.tls = tls
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                              thread_name_prefix="broker"))
        broker_pb2_grpc.add_CredentialBrokerServicer_to_server(
            BrokerServicer(service, Authenticator(service.config.identity), metrics), self._server)
        self.port: int | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        creds = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
        self.port = self._server.add_secure_port(f"{host}:{port}", creds)
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}")
        self._server.start()
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


@dataclasses.dataclass
class BrokerRuntime:
    """Everything :func:`start_broker` started; ``close()`` stops it all."""

    server: BrokerServer
    oidc_server: OidcServer | None
    tls: TlsIdentity
    port: int
    metrics: BrokerMetrics | None = None
    #: The port ``/metrics`` is served on (None: ``metrics_listen`` is not set).
    metrics_port: int | None = None

    def close(self) -> None:
        self.server.stop()
        if self.metrics:
            self.metrics.close()
        if self.oidc_server:
            self.oidc_server.close()


def start_broker(config: BrokerConfig, seeds: SeedBundle, *, state_path: str | Path,
                 audit: Sequence[AuditSink], sts_client: Any | None = None,
                 notifiers: Sequence[Callable] = (), host: str = "127.0.0.1", port: int = 0,
                 oidc_listen: tuple[str, int] | None = None, cert_out: str | Path | None = None,
                 clock: Callable[[], datetime] | None = None, attester: Any | None = None) -> BrokerRuntime:
    """Wire and start the broker from already-opened seeds (see :func:`enclave_bridge.seeds.open_bundle`).

    ``sts_client`` is a boto3 STS client (made from the seeds' AWS credentials by the caller);
    ``cert_out`` receives the certificate PEM so operators can distribute it for pinning; with an
    ``attester`` (the NSM), ``<cert_out>.att`` receives an attestation document binding it.
    """
    records = SealedRecords(SqliteHostStorage(state_path), seeds.state_key)
    for sink in audit:  # a chained audit log keeps its head in the sealed state (see audit_chain)
        bind = getattr(sink, "bind_sealed_head", None)
        if bind is not None:
            bind(records)
    oidc = OidcIssuer(config.oidc_issuer, seeds.signing_key()) if config.clusters else None
    kwargs = {"clock": clock} if clock else {}
    metrics = BrokerMetrics(audit_sinks=audit) if config.metrics_listen else None
    service = BrokerService(config, records, audit=audit, sts=StsMinter(sts_client) if sts_client else None,
                            oidc=oidc, notifiers=[*notifiers, *([metrics.observe] if metrics else [])],
                            **kwargs)
    metrics_port = None
    if metrics is not None and config.metrics_listen is not None:
        metrics.set_counts(service.counts)
        metrics_port = metrics.serve(*config.metrics_listen)
        log.info("broker metrics on http://%s:%d/metrics", config.metrics_listen[0], metrics_port)
    tls = make_tls_identity(config.server_name)
    server = BrokerServer(service, tls, metrics=metrics)
    try:
        bound = server.start(host, port)
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    oidc_server = oidc.serve(*oidc_listen) if (oidc and oidc_listen) else None
    if cert_out:
        Path(cert_out).write_bytes(tls.cert_pem)
        if attester is not None:
            Path(f"{cert_out}.att").write_bytes(attest_certificate(attester, tls))
    log.info("broker listening on %s:%d, certificate %s", host, bound, tls.fingerprint)
    return BrokerRuntime(server, oidc_server, tls, bound, metrics, metrics_port)
