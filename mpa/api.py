"""The approvals HTTP API (JSON under ``/api/v1``) and the app that also serves the page.

Every operation needs ``Authorization: Bearer <JWT>`` from the configured issuer. Refusals are
``{"error": {"code", "message"}}`` with a status that says what kind of refusal it is:
401 not authenticated, 403 not allowed (self-approval, not eligible), 404 unknown request,
409 the request's state forbids it (already approved by you, closed, expired, awaiting reason),
400 malformed JSON, 422 a body that does not validate, 503 a dependency is down. A refusal
never changes state. The OpenAPI spec is at ``/openapi.json``.
"""

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import policy
from policy import (
    AlreadyDecided,
    InvalidRequest,
    NotEligible,
    PolicyError,
    RequestClosed,
    RequestExpired,
    RequestState,
    SelfApproval,
    StoreError,
    Target,
    UnknownRequest,
)
from policy.store import Store

from .auth import AuthError, Principal, TokenVerifier
from .body_types import BodyEncoder, body_digest, body_view
from .broker_link import BrokerLink
from .config import ApprovalsConfig
from .metrics import ApprovalsMetrics
from .receipts import ReceiptOut, ReceiptUnavailable, load_receipt_key, public_pem, sign_receipt
from .schemas import (
    CommentIn,
    CompleteIn,
    CreateRequestIn,
    DevTokenIn,
    DevTokenOut,
    ErrorOut,
    RequestListOut,
    RequestOut,
    WhoAmIOut,
)
from .service import ApprovalService, AwaitingReason, ModeLookup, ModeUnavailable, utcnow

log = logging.getLogger("mpa.api")

#: HTTP status for each refusal.
STATUS = {
    SelfApproval: 403, NotEligible: 403, AlreadyDecided: 409, RequestClosed: 409,
    RequestExpired: 409, AwaitingReason: 409, InvalidRequest: 422,
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": words} for code, words in {
        400: "malformed JSON", 401: "missing, forged or expired token",
        403: "not allowed: self-approval, not an eligible reviewer, or not visible to you",
        404: "no request with this id", 409: "the request's state forbids this",
        422: "the body or the request is invalid", 503: "a dependency is unavailable",
    }.items()}

RequestId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                description="the request id from its link")]


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def status_of(e: Exception) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 403 if isinstance(e, PolicyError) else 500


def create_app(config: ApprovalsConfig, store: Store, *, mode_lookup: ModeLookup | None = None,
               verifier: TokenVerifier | None = None, dev_issuer: Any = None,
               clock: Callable = utcnow, broker: BrokerLink | None = None,
               body_encoder: BodyEncoder | None = None) -> FastAPI:
    """The approvals app: JSON API, approval page and inbox, dev login (when enabled).

    With ``broker``, the inbox also lists credential (broker) requests and serves their pages.
    With ``body_encoder`` (reflection), ``createRequest`` takes ``body_json``.
    """
    app = FastAPI(
        title="rpcauthz approvals", version="1.0.0",
        description="Multi-party approval requests for RPCs that need another engineer's "
                    "approval. Authenticate with the same JWT the gateway accepts.",
        docs_url=None, redoc_url=None)
    service = ApprovalService(store, config.policy, mode_lookup, clock, auditors=config.auditors)
    app.state.service = service
    app.state.config = config
    app.state.verifier = verifier or TokenVerifier(config.issuer, config.jwks_url, config.audiences)
    app.state.dev_issuer = dev_issuer if config.dev_login is not None else None
    app.state.broker = broker
    app.state.metrics = ApprovalsMetrics(store)
    app.state.metrics.install(app)

    def link(request_id: str) -> str:
        return f"{config.public_url.rstrip('/')}/requests/{request_id}"
    app.state.link = link

    def out(r: policy.ApprovalRequest, viewer: str) -> RequestOut:
        view = store.get_body_view(r.id) if r.body_sha256 else None
        return RequestOut.build(r, link(r.id), service.permissions(r, viewer), service.eligible(r),
                                view)

    # --- errors -------------------------------------------------------------------------------
    @app.exception_handler(AuthError)
    async def _auth(_: Request, e: AuthError) -> JSONResponse:
        return error_response(401, e.code, str(e), {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    @app.exception_handler(PolicyError)
    async def _policy(_: Request, e: PolicyError) -> JSONResponse:
        return error_response(status_of(e), e.code, str(e))

    @app.exception_handler(UnknownRequest)
    async def _unknown(request: Request, e: UnknownRequest) -> JSONResponse:
        rid = request.path_params.get("request_id", "")
        return error_response(404, "unknown_request", f"no approval request has id {rid!r}")

    @app.exception_handler(StoreError)
    async def _store(_: Request, e: StoreError) -> JSONResponse:
        if isinstance(e, ModeUnavailable):
            return error_response(503, "mode_unavailable", str(e))
        log.error("store unavailable: %s", e)
        return error_response(503, "store_unavailable", "the approvals store is unavailable; try again")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        parts = []
        for err in errors:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else f"request body: {err.get('msg')}")
        return error_response(422, "invalid_body", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:
            # Starlette names only the first matching route's methods; name them all.
            allowed = set()
            for route in app.router.routes:
                match, _ = route.matches({**request.scope, "method": "GET"})
                methods = getattr(route, "methods", None)
                if match.name != "NONE" and methods:
                    allowed |= methods - {"HEAD"}
            headers["Allow"] = ", ".join(sorted(allowed))
            return error_response(405, code, f"{request.method} is not allowed here; use "
                                              f"{headers['Allow']}", headers)
        return error_response(e.status_code, code, str(e.detail), headers or None)

    # --- auth ---------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("send 'Authorization: Bearer <token>' (get one with: mpa login)")
        return app.state.verifier.verify(token.strip())

    Me = Annotated[Principal, Depends(principal)]

    # --- operations ---------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/me", response_model=WhoAmIOut, responses={401: _ERRORS[401]},
             operation_id="whoami", summary="Who the token says you are, and your roles")
    def whoami(me: Me) -> WhoAmIOut:
        grants = service.grants().roles_of(me.id, clock())
        roles = [g.role.value + (f":{g.service}" if g.service else "") for g in grants]
        return WhoAmIOut(principal=me.id, name=me.name, roles=sorted(roles))

    @app.post("/api/v1/requests", status_code=201, response_model=RequestOut,
              operation_id="createRequest", summary="Ask for approval to call an RPC",
              responses={200: {"model": RequestOut, "description": "an open request with the "
                               "same scope already existed (its reason is now set if it was "
                               "waiting for one)"},
                         **{k: _ERRORS[k] for k in (400, 401, 403, 422, 503)}})
    async def create_request(body: CreateRequestIn, me: Me) -> Any:
        try:
            target = Target(body.service, body.method)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        duration = timedelta(seconds=body.duration_seconds) if body.duration_seconds else None
        view = None
        if body.body_json is not None:
            if body.body_sha256 is not None:
                raise InvalidRequest("give body_json or body_sha256, not both")
            msg = await _encode_body(body_encoder, body.service, body.method, body.body_json)
            view = body_view(msg)
            body = body.model_copy(update={"body_sha256": body_digest(msg), "body_json": None})
        waiting = await asyncio.to_thread(service.open_gateway_request, me.id, target,
                                          body.body_sha256)
        if waiting is not None:
            # Give the gateway-opened request its reason and the requester's limits (narrowing
            # only); its mode is known, so no lookup.
            done = await asyncio.to_thread(
                service.complete, waiting.id, me.id, reason=body.reason, incident=body.incident,
                approval_ttl=duration, max_uses=body.max_uses, body_sha256=body.body_sha256)
            if view is not None and done.body_sha256 == body.body_sha256:
                await asyncio.to_thread(store.put_body_view, done.id, view)
            result = await asyncio.to_thread(out, done, me.id)
            return JSONResponse(result.model_dump(mode="json"), status_code=200)
        mode = await _resolve_mode(service, body.service, body.method)
        r, created = await asyncio.to_thread(
            service.create, me.id, target, mode, reason=body.reason, incident=body.incident,
            body_sha256=body.body_sha256, duration=duration, max_uses=body.max_uses)
        if view is not None and r.body_sha256 == body.body_sha256:
            await asyncio.to_thread(store.put_body_view, r.id, view)
        result = await asyncio.to_thread(out, r, me.id)
        return JSONResponse(result.model_dump(mode="json"), status_code=201 if created else 200)

    @app.get("/api/v1/requests", response_model=RequestListOut, operation_id="listRequests",
             summary="List requests: yours, those you can review, or all (auditors only)",
             responses={k: _ERRORS[k] for k in (401, 403, 422, 503)})
    def list_requests(me: Me,
                      scope: Annotated[str, Query(pattern="^(mine|reviewable|all)$")] = "mine",
                      state: Annotated[RequestState | None, Query()] = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100) -> RequestListOut:
        found = service.list(me.id, scope=scope, states=[state] if state else None, limit=limit)
        return RequestListOut(requests=[out(r, me.id) for r in found])

    @app.get("/api/v1/requests/{request_id}", response_model=RequestOut, operation_id="getRequest",
             summary="One request, with who approved it and when",
             responses={k: _ERRORS[k] for k in (401, 403, 404, 422, 503)})
    def get_request(request_id: RequestId, me: Me) -> RequestOut:
        return out(service.view(request_id, me.id), me.id)

    if config.receipt_key_path:  # the route exists only where receipts are signed
        _add_receipt_route(app, service, load_receipt_key(config.receipt_key_path), Me)

    @app.post("/api/v1/requests/{request_id}/approve", response_model=RequestOut,
              operation_id="approveRequest", summary="Approve a request you may review",
              responses={k: _ERRORS[k] for k in (400, 401, 403, 404, 409, 422, 503)})
    def approve(request_id: RequestId, me: Me, body: CommentIn | None = None) -> RequestOut:
        return out(service.approve(request_id, me.id, body.comment if body else ""), me.id)

    @app.post("/api/v1/requests/{request_id}/reject", response_model=RequestOut,
              operation_id="rejectRequest", summary="Reject a request you may review",
              responses={k: _ERRORS[k] for k in (400, 401, 403, 404, 409, 422, 503)})
    def reject(request_id: RequestId, me: Me, body: CommentIn | None = None) -> RequestOut:
        return out(service.reject(request_id, me.id, body.comment if body else ""), me.id)

    @app.post("/api/v1/requests/{request_id}/cancel", response_model=RequestOut,
              operation_id="cancelRequest",
              summary="Withdraw your request, or revoke an approval you gave",
              responses={k: _ERRORS[k] for k in (400, 401, 403, 404, 409, 422, 503)})
    def cancel(request_id: RequestId, me: Me, body: CommentIn | None = None) -> RequestOut:
        return out(service.cancel(request_id, me.id, body.comment if body else ""), me.id)

    @app.post("/api/v1/requests/{request_id}/complete", response_model=RequestOut,
              operation_id="completeRequest",
              summary="Give the reason for a request the gateway opened for you",
              responses={k: _ERRORS[k] for k in (400, 401, 403, 404, 409, 422, 503)})
    def complete(request_id: RequestId, body: CompleteIn, me: Me) -> RequestOut:
        return out(service.complete(request_id, me.id, reason=body.reason,
                                    incident=body.incident), me.id)

    if app.state.dev_issuer is not None:
        log.warning("DEV LOGIN IS ON: anyone can sign in as anyone (dev issuer); never in production")

        @app.post("/api/dev/token", response_model=DevTokenOut, operation_id="devToken",
                  summary="DEV ONLY: mint a dev-issuer token for an engineer (mpa login --as)",
                  responses={k: _ERRORS[k] for k in (400, 422)})
        def dev_token(body: DevTokenIn) -> DevTokenOut:
            return DevTokenOut(token=app.state.dev_issuer.mint(body.subject, ttl_seconds=8 * 3600))

        @app.get("/.well-known/jwks.json", include_in_schema=False)
        def dev_jwks() -> dict[str, Any]:
            """DEV ONLY: the dev tokens' public keys, for Envoy's jwt_authn."""
            return dict(app.state.dev_issuer.jwks())

    from .page import add_page_routes
    add_page_routes(app)
    return app


async def _encode_body(encoder: BodyEncoder | None, svc: str, method: str,
                       body: dict[str, Any]) -> Any:
    """The request message for ``body`` via reflection; failures never bind a guess."""
    if encoder is None:
        raise InvalidRequest("this approvals server cannot read request bodies: it has no "
                             "reflection configuration; give body_sha256 instead")
    try:
        return await encoder(svc, method, body)
    except (PolicyError, StoreError):
        raise
    except Exception as e:
        code = getattr(e, "code", "")
        if code in ("unknown_service", "unknown_method"):
            raise InvalidRequest(f"/{svc}/{method}: {e}") from None
        log.warning("body type lookup for /%s/%s failed: %s", svc, method, e)
        raise ModeUnavailable(f"could not learn the input type of /{svc}/{method} from the "
                              "service (reflection unavailable); try again") from None


def _add_receipt_route(app: FastAPI, service: ApprovalService, key: Any, Me: Any) -> None:  # noqa: N803
    """``GET /api/v1/requests/{id}/receipt``: the signed receipt of an approved request (mpa.receipts)."""

    @app.get("/api/v1/requests/{request_id}/receipt", response_model=ReceiptOut, operation_id="getReceipt",
             summary="A signed receipt for an approved request (for parties that do not share the store)",
             responses={k: _ERRORS[k] for k in (401, 404, 409, 422, 503)})
    def receipt(request_id: RequestId, me: Me) -> Any:
        try:
            signed = sign_receipt(service.get(request_id), key)
        except ReceiptUnavailable as e:
            return error_response(409, "not_approved", str(e))
        return ReceiptOut(receipt=signed, public_key=public_pem(key))


async def _resolve_mode(service: ApprovalService, svc: str, method: str) -> policy.Mode:
    """The method's mode from the configured lookup; failures never guess a mode."""
    try:
        return await service.resolve_mode(svc, method)
    except (PolicyError, StoreError):
        raise
    except Exception as e:  # reflection errors: unknown service/method vs unreachable
        code = getattr(e, "code", "")
        if code in ("unknown_service", "unknown_method"):
            raise InvalidRequest(f"/{svc}/{method}: {e}") from None
        log.warning("mode lookup for /%s/%s failed: %s", svc, method, e)
        raise ModeUnavailable(f"could not learn the mode of /{svc}/{method} from the service "
                              "(reflection unavailable); try again") from None
