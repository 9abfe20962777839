"""A client for the broker that pins its certificate and sends the engineer's token."""
from __future__ import annotations

from typing import Any

import grpc

from mpa.v1 import broker_pb2, broker_pb2_grpc


class BrokerClient:
    """``target`` is ``host:port`` (usually the gateway's passthrough listener); ``cert_pem`` is the
    broker's own certificate, trusted alone (pinned); ``server_name`` is its SNI name."""

    def __init__(self, target: str, cert_pem: bytes, token: str, *, server_name: str = "broker.mpa.internal",
                 timeout: float = 15.0) -> None:
        if b"BEGIN CERTIFICATE" not in cert_pem:
            raise ValueError("the broker certificate must be PEM")
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        self._channel = grpc.secure_channel(target, creds, options=[
            ("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)])
        self._stub = broker_pb2_grpc.CredentialBrokerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)

    def request_aws(self, role: str, *, reason: str, incident: str = "", duration_seconds: int = 0):
        return self._call("Request", broker_pb2.RequestCredentialsRequest(
            aws=broker_pb2.AwsTarget(role=role), reason=reason, incident=incident,
            duration_seconds=duration_seconds))

    def request_kubernetes(self, cluster: str, groups: list[str], *, reason: str, incident: str = "",
                           duration_seconds: int = 0):
        return self._call("Request", broker_pb2.RequestCredentialsRequest(
            kubernetes=broker_pb2.KubernetesTarget(cluster=cluster, groups=groups), reason=reason,
            incident=incident, duration_seconds=duration_seconds))

    def review(self, request_id: str, *, approve: bool, comment: str = ""):
        verdict = broker_pb2.ReviewRequest.VERDICT_APPROVE if approve else broker_pb2.ReviewRequest.VERDICT_REJECT
        return self._call("Review", broker_pb2.ReviewRequest(id=request_id, verdict=verdict, comment=comment))

    def fetch(self, request_id: str) -> broker_pb2.FetchResponse:
        return self._call("Fetch", broker_pb2.FetchRequest(id=request_id))

    def list(self, *, mine: bool = False, reviewable: bool = False, states=(), limit: int = 100):
        return self._call("List", broker_pb2.ListRequest(mine=mine, reviewable=reviewable, states=list(states),
                                                         limit=limit)).requests

    def get(self, request_id: str):
        return self._call("Get", broker_pb2.GetRequest(id=request_id))

    def close(self) -> None:
        self._channel.close()
