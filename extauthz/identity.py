"""Step 1 of 4, identity: who is calling.

The principal comes from the JWT payload that Envoy's jwt_authn filter has already
verified (signature, issuer, audience, expiry) and placed in the request's metadata
under ``payload_in_metadata``. We never parse a token ourselves: if the metadata is not
there, jwt_authn did not verify one, and the call is refused.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.struct_pb2 import Struct

from policy.principals import MAX_PRINCIPAL_LENGTH, usable_principal

from .config import Identity as IdentityConfig


class IdentityError(Exception):
    """The caller could not be identified. The message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    principal: str
    #: "jwt" for a verified token, "dev-header" for dev mode.
    source: str
    #: The verified token payload (a protobuf Struct), or None in dev mode.
    claims: object

    @property
    def dev(self) -> bool:
        return self.source == "dev-header"


def identify(req: external_auth_pb2.CheckRequest, cfg: IdentityConfig) -> Identity:
    """The verified principal of ``req``, or ``IdentityError``."""
    if cfg.dev_mode:
        headers = req.attributes.request.http.headers
        value = headers.get(cfg.dev_principal_header, "")
        return Identity(_check_principal(value, "header", cfg.dev_principal_header), "dev-header", None)
    return identity_from_metadata(req.attributes.metadata_context.filter_metadata, cfg)


def identity_from_metadata(filter_metadata: Mapping[str, Struct], cfg: IdentityConfig) -> Identity:
    """The verified principal in Envoy's dynamic metadata (``filter_metadata``, as a Check or
    an access log entry carries it), or ``IdentityError``."""
    ns = filter_metadata
    if cfg.metadata_namespace not in ns:
        raise IdentityError("no verified identity: the gateway's JWT filter passed no token payload "
                            "(send a valid bearer token in the authorization header)")
    fields = ns[cfg.metadata_namespace].fields
    payload = fields[cfg.payload_key] if cfg.payload_key in fields else None
    if payload is None or payload.WhichOneof("kind") != "struct_value":
        raise IdentityError(f"no verified identity: metadata {cfg.metadata_namespace} has no "
                            f"{cfg.payload_key!r} token payload")
    token = payload.struct_value
    claims = token.fields
    claim = claims[cfg.principal_claim] if cfg.principal_claim in claims else None
    if claim is None or claim.WhichOneof("kind") != "string_value":
        raise IdentityError(f"the verified token has no string {cfg.principal_claim!r} claim "
                            "to identify the caller")
    return Identity(_check_principal(claim.string_value, "claim", repr(cfg.principal_claim)), "jwt", token)


def _check_principal(value: str, what: str, name: str) -> str:
    """``value`` if it is a usable principal; else ``IdentityError`` naming ``what name``."""
    if usable_principal(value):
        return value  # the usual case: no message to build
    where = f"{what} {name}"
    if not value:
        raise IdentityError(f"no identity: {where} is empty or absent")
    if len(value) > MAX_PRINCIPAL_LENGTH:
        raise IdentityError(f"{where} is longer than {MAX_PRINCIPAL_LENGTH} characters")
    # Non-empty, short enough, and still refused by usable_principal: what is left is that.
    raise IdentityError(f"{where} contains whitespace or control characters")
