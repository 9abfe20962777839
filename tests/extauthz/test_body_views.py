"""The gateway keeps approvers' views of the body-bound requests it opens (``BodyViews``), and
only on the approval-required path: an allow never looks up an input type, and a lookup or
decoding failure leaves no view without changing the verdict. Driven through
``Authorizer.check`` with the real SQLite store; through real Envoy in
tests/mpa/test_gateway_body_view.py."""
from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor

from extauthz.audit_writer import AuditWriter
from extauthz.config import load_settings
from extauthz.metrics import Metrics
from extauthz.pipeline import Authorizer
from policy import Grant, GrantSet, Mode, Role
from policy.stores import open_store
from reflection_cache.types import ReflectionUnavailable, ServiceModes
from rpcauthz.demo.v1 import accounts_pb2
from tests.support.extauthz_doubles import FixedGrants, StaticModes
from tests.support.grpc_frames import frame

SVC = "rpcauthz.demo.v1.Accounts"
MODES = {"Open": Mode.ENGINEERS_WITHOUT_APPROVAL, "Read": Mode.ENGINEERS_WITH_APPROVAL}
GRANTS = GrantSet([Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)])
BODY = accounts_pb2.AccountRequest(account_id="A-7", note="refund",
                                   customer_email="a7@example.com").SerializeToString()


class TypedModes(StaticModes):
    """Modes that can also look up input types (like the ``ReflectionCache``)."""

    def __init__(self) -> None:
        super().__init__({SVC: ServiceModes(SVC, MODES)})
        self.lookups: list[tuple[str, str]] = []
        self.lookup_fails = False

    async def method_input_type(self, service: str, method: str) -> Descriptor:
        self.lookups.append((service, method))
        if self.lookup_fails:
            raise ReflectionUnavailable(f"service {service}: reflection down")
        return accounts_pb2.AccountRequest.DESCRIPTOR


def _authorizer(modes: TypedModes):
    settings = load_settings(env={}, overrides={
        "store_url": "memory:", "approvals.bind_to_body_modes": ["ENGINEERS_WITH_APPROVAL"]})
    store = open_store("sqlite:///:memory:")
    metrics = Metrics()
    return Authorizer(settings, store=store, grants=FixedGrants(GRANTS), modes=modes,
                      audit=AuditWriter(store, metrics, 100), metrics=metrics), store


async def _check(a: Authorizer, method: str, body: bytes) -> external_auth_pb2.CheckResponse:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.path, http.method, http.raw_body = f"/{SVC}/{method}", "POST", frame(body)
    payload = struct_pb2.Struct()
    payload.update({"jwt_payload": {"sub": "alice", "iss": "x"}})
    req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(payload)
    return await a.check(req)


def _request_id(resp: external_auth_pb2.CheckResponse) -> str:
    for h in resp.denied_response.headers:
        if h.header.key == "x-mpa-request-url":
            return h.header.value.rsplit("/", 1)[1]
    raise AssertionError(f"no request id in {resp}")


async def test_an_allow_never_looks_up_the_input_type():
    modes = TypedModes()
    a, _store = _authorizer(modes)
    resp = await _check(a, "Open", BODY)
    assert resp.status.code == 0
    assert a.body_views is not None
    await a.body_views.drain()
    assert modes.lookups == []


async def test_approval_required_keeps_the_redacted_view_once():
    modes = TypedModes()
    a, store = _authorizer(modes)
    first = await _check(a, "Read", BODY)
    assert first.status.code == 7  # PERMISSION_DENIED: approval required
    assert a.body_views is not None
    await a.body_views.drain()
    rid = _request_id(first)
    view = store.get_body_view(rid)
    assert view is not None and view.startswith("rpcauthz.demo.v1.AccountRequest {")
    assert '"accountId": "A-7"' in view and '"customerEmail": "[REDACTED]"' in view
    assert "a7@example.com" not in view
    again = await _check(a, "Read", BODY)
    await a.body_views.drain()
    assert _request_id(again) == rid and modes.lookups == [(SVC, "Read")]  # kept once


async def test_a_failed_lookup_leaves_no_view_and_the_same_verdict(caplog):
    modes = TypedModes()
    modes.lookup_fails = True
    a, store = _authorizer(modes)
    resp = await _check(a, "Read", BODY)
    assert resp.status.code == 7
    assert a.body_views is not None
    await a.body_views.drain()
    assert store.get_body_view(_request_id(resp)) is None
    assert "no body view for request" in caplog.text and "reflection down" in caplog.text
