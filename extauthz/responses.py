"""Step 4 of 4, the response: a ``Verdict`` as Envoy's ``CheckResponse``.

* allow: OK with headers for the upstream (who, which approval, which decision); any
  ``x-rpcauthz-*`` header the client sent is removed first, so nobody can forge them.
* deny / approval required: HTTP 403 with a plain-text body (Envoy turns it into
  grpc-status 7 with the body as grpc-message) and, when approval can unlock the call,
  the request link in ``x-mpa-request-url``.
* error: HTTP 503 (grpc-status 14 for gRPC callers). Never an allow.

Every response carries dynamic metadata for Envoy's access log.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from policy import Mode, Target

from .verdict import Kind, Verdict

HEADER_PREFIX = "x-rpcauthz-"
PRINCIPAL_HEADER = "x-rpcauthz-principal"
APPROVAL_HEADER = "x-rpcauthz-approval"
DECISION_HEADER = "x-rpcauthz-decision-id"
REQUEST_URL_HEADER = "x-mpa-request-url"
MAX_BODY = 2048

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def metadata(v: Verdict) -> struct_pb2.Struct:
    """The decision's fields for ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:...)%``."""
    s = struct_pb2.Struct()
    f = s.fields
    f["decision_id"].string_value = v.decision_id
    f["outcome"].string_value = v.kind.value
    f["mode"].string_value = v.mode_name
    f["rule"].string_value = v.rule
    f["principal"].string_value = v.principal or "-"
    f["target"].string_value = v.target.path if v.target else "-"
    if v.approval_id:
        f["approval_id"].string_value = v.approval_id
    if v.request_id:
        f["request_id"].string_value = v.request_id
    if v.dev:
        f["dev"].bool_value = True
    if v.dry_run:  # dry-run rollout (extauthz/dry_run.py)
        f["dry_run"].bool_value = True
        f["shadow"].string_value = v.shadow or "none"
    return s


def caller_text(v: Verdict) -> str:
    """The one-paragraph explanation a denied caller reads (it becomes the grpc-message)."""
    who = v.principal or "an unidentified caller"
    what = v.target.path if v.target else "this request"
    head = {Kind.DENY: "denied", Kind.APPROVAL_REQUIRED: "approval required",
            Kind.ERROR: "authorization unavailable", Kind.ALLOW: "allowed"}[v.kind]
    message, advice = v.explained()
    parts = [f"rpcauthz: {head} for {who} calling {what} (rule {v.rule}"
             + (f", mode {v.mode_name}" if v.mode is not None else "") + f"): {message}."]
    if v.request_url:
        parts.append(f"Approval request: <{v.request_url}>.")
    if advice:
        parts.append(advice[0].upper() + advice[1:].rstrip(".") + ".")
    if v.dev:
        parts.append("[dev mode: identity taken from a header, not a verified token]")
    parts.append(f"(decision {v.decision_id})")
    text = " ".join(parts)
    return text if len(text) <= MAX_BODY else text[:MAX_BODY - 3] + "..."


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value),
                                      append_action=_OVERWRITE)


#: Allow responses without the decision id, by what they depend on (``_allow_template``).
_TemplateKey = tuple[str | None, Target | None, Mode | None, str, bool, bool, str | None]
_ALLOW_TEMPLATES: dict[_TemplateKey, external_auth_pb2.CheckResponse] = {}
#: One template per (principal, RPC, ...) in use, about 3 KB each: 8,192 is ~25 MB and holds
#: the combinations a 10,000-engineer organisation calls at once. When full, the oldest
#: quarter is dropped (insertion order), so the hot ones stay; it never empties at once.
_MAX_TEMPLATES = 8192
#: Where the decision id goes in a template's ``ok_response.headers``.
_DECISION_HEADER_INDEX = 1


def _allow_template(v: Verdict) -> external_auth_pb2.CheckResponse:
    """The allow response for ``v`` with an empty decision id. Everything else in it is a
    function of ``v``'s principal, target, mode, rule, dev and dry-run fields (``metadata``
    and the headers), so it is built once per such combination and copied: a copy is ~4x
    cheaper than building the headers and the metadata Struct again."""
    key: _TemplateKey = (v.principal, v.target, v.mode, v.rule, v.dev, v.dry_run, v.shadow)
    resp = _ALLOW_TEMPLATES.get(key)
    if resp is None:
        if len(_ALLOW_TEMPLATES) >= _MAX_TEMPLATES:
            for old in list(itertools.islice(_ALLOW_TEMPLATES, _MAX_TEMPLATES // 4)):
                del _ALLOW_TEMPLATES[old]
        resp = _ALLOW_TEMPLATES[key] = _build_allow(v, decision_id="")
    return resp


def _build_allow(v: Verdict, decision_id: str) -> external_auth_pb2.CheckResponse:
    # Filled in place (add/extend) rather than built from nested messages: no copies.
    resp = external_auth_pb2.CheckResponse()
    resp.status.code = code_pb2.OK
    ok = resp.ok_response
    set_headers = {PRINCIPAL_HEADER: v.principal or "", DECISION_HEADER: decision_id}
    if v.approval_id:
        set_headers[APPROVAL_HEADER] = v.approval_id
    for key, value in set_headers.items():
        opt = ok.headers.add()
        opt.header.key, opt.header.value = key, value
        opt.append_action = _OVERWRITE
    meta = metadata(v)
    meta.fields["decision_id"].string_value = decision_id
    resp.dynamic_metadata.CopyFrom(meta)
    return resp


def _headers_to_remove(request_headers: Iterable[str], also_remove: Iterable[str],
                       keep: tuple[str, ...]) -> list[str]:
    """Client headers that only we may set (``x-rpcauthz-*``, any case), except those the
    response sets itself (``keep``; Envoy overwrites them), plus ``also_remove``."""
    strip = {h.lower() for h in also_remove} if also_remove else set()
    names = list(request_headers)
    if HEADER_PREFIX not in "\n".join(names).lower():  # the usual case, in one pass
        return sorted(strip)
    n = len(HEADER_PREFIX)
    for h in names:
        if h[:n].lower() == HEADER_PREFIX:
            low = h.lower()
            if low not in keep:
                strip.add(low)
    return sorted(strip)


_SET_ON_ALLOW: tuple[str, ...] = (PRINCIPAL_HEADER, DECISION_HEADER)
_SET_ON_APPROVED_ALLOW: tuple[str, ...] = (PRINCIPAL_HEADER, DECISION_HEADER, APPROVAL_HEADER)


def build(v: Verdict, request_headers: Iterable[str] = (),
          also_remove: Iterable[str] = ()) -> external_auth_pb2.CheckResponse:
    """The ``CheckResponse`` for ``v``. ``request_headers`` are the names the client sent."""
    if v.kind is Kind.ALLOW:
        if v.approval_id or v.request_id:
            # Allows through an approval are rare and did store I/O anyway: build afresh.
            resp = _build_allow(v, v.decision_id)
            keep = _SET_ON_APPROVED_ALLOW
        else:
            resp = external_auth_pb2.CheckResponse()
            resp.CopyFrom(_allow_template(v))
            resp.ok_response.headers[_DECISION_HEADER_INDEX].header.value = v.decision_id
            resp.dynamic_metadata.fields["decision_id"].string_value = v.decision_id
            keep = _SET_ON_ALLOW
        strip = _headers_to_remove(request_headers, also_remove, keep)
        if strip:
            resp.ok_response.headers_to_remove.extend(strip)
        return resp
    meta = metadata(v)
    if v.kind is Kind.ERROR:
        grpc_code, http = code_pb2.UNAVAILABLE, http_status_pb2.ServiceUnavailable
    else:
        grpc_code, http = code_pb2.PERMISSION_DENIED, http_status_pb2.Forbidden
    headers = [_header("content-type", "text/plain; charset=utf-8"),
               _header(DECISION_HEADER, v.decision_id)]
    if v.request_url:
        headers.append(_header(REQUEST_URL_HEADER, v.request_url))
    text = caller_text(v)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=text),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http), headers=headers, body=text),
        dynamic_metadata=meta)
