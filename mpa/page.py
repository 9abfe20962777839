"""The approval web page that request links open: ``/requests/{id}``.

Server-rendered with Jinja2; plain HTML forms, so it works without JavaScript. Identity comes
from the ``mpa_session`` cookie (HttpOnly, SameSite=Lax) holding a JWT from the configured
issuer, or from an ``Authorization: Bearer`` header that an SSO proxy in front adds (the hook
for real OIDC). Every POST carries a CSRF token bound to that session (an HMAC of the session
token under a server secret) and is refused without it. Nothing secret goes in a URL, and the
page never logs tokens or request payloads.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from policy import PolicyError, StoreError, UnknownRequest

from .auth import AuthError, Principal
from .service import MODE_EXPLANATIONS, NotVisible, approver_words, awaiting_reason, routing_note, spoken_duration

log = logging.getLogger("mpa.page")

SESSION_COOKIE = "mpa_session"
LOGIN_CSRF_COOKIE = "mpa_login_csrf"
DEV_SESSION_SECONDS = 8 * 3600

_env = Environment(loader=PackageLoader("mpa", "templates"), autoescape=select_autoescape(["html"]))

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

#: What a form POST without the session's CSRF token is told (page and inbox alike).
CSRF_REFUSED = ("Refused: the form's CSRF token is missing or wrong, so nothing was changed. "
                "Reload the page and try again.")

_DONE_WORDS = {"approved": "Your approval is recorded.", "rejected": "You rejected this request.",
               "cancelled": "The request is cancelled.",
               "completed": "Your reason is recorded; reviewers have been told."}


def _fmt(dt: datetime | None) -> str:
    return "" if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe_next(value: str | None) -> str:
    """Only same-site paths: never an open redirect."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def add_page_routes(app: FastAPI) -> None:
    """Mount the page, the login form (dev issuer only) and logout on ``app``."""
    config = app.state.config
    service = app.state.service
    secret = config.csrf_secret or secrets.token_bytes(32)

    def render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = _env.get_template(name).render(fmt=_fmt, **ctx)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def session_token(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return request.cookies.get(SESSION_COOKIE) or None

    def csrf_for(token: str) -> str:
        digest = hashlib.sha256(token.encode()).digest()
        return hmac.new(secret, b"csrf:" + digest, hashlib.sha256).hexdigest()

    def who(request: Request) -> tuple[Principal | None, str | None, str]:
        """(principal, session token, why not signed in)."""
        token = session_token(request)
        if not token:
            return None, None, "You need to sign in to see this request."
        try:
            return app.state.verifier.verify(token), token, ""
        except AuthError as e:
            return None, None, f"Your sign-in is no longer valid ({e}). Sign in again."

    async def posted_form(request: Request, what: str,
                          refuse: Callable[[Principal, str], Awaitable[Response]]
                          ) -> tuple[Principal, str, Any] | Response:
        """A POSTed form from a signed-in viewer carrying the session's CSRF token:
        ``(viewer, token, form)``. Otherwise the response to send instead: the sign-in notice,
        or (logged as a refused ``what``) ``refuse(viewer, token)``, which shows the page with
        :data:`CSRF_REFUSED` and status 403. Every form of the page and the inbox comes here."""
        viewer, token, why = who(request)
        if viewer is None or token is None:
            return login_needed(request, why)
        form = await request.form()
        sent = str(form.get("csrf_token", ""))
        if not sent or not hmac.compare_digest(sent, csrf_for(token)):
            log.warning("refused %s by %s: missing or wrong CSRF token", what, viewer.id)
            return await refuse(viewer, token)
        return viewer, token, form

    def login_needed(request: Request, why: str) -> HTMLResponse:
        resp = render("message.html", 401, heading="Sign in required", message=why, viewer=None,
                      kind="info", login_link=f"/login?next={quote(request.url.path)}")
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    async def show(request: Request, request_id: str, viewer: Principal, token: str, *,
                   status: int = 200, error: str = "", done: str = "") -> HTMLResponse:
        try:
            r = await asyncio.to_thread(service.view, request_id, viewer.id)
            perms = await asyncio.to_thread(service.permissions, r, viewer.id)
        except NotVisible as e:
            return render("message.html", 403, heading="Not yours to see", viewer=viewer,
                          csrf_token=csrf_for(token), message=f"{error} {e}" if error else str(e))
        except UnknownRequest:
            return render("message.html", 404, heading="No such request", viewer=viewer,
                          csrf_token=csrf_for(token),
                          message=f"There is no approval request with id {request_id}. "
                                  "Check the link you were given.")
        except StoreError:
            return render("message.html", 503, heading="Unavailable", viewer=viewer,
                          csrf_token=csrf_for(token),
                          message="The approvals store is unavailable right now; try again.")
        eligible = await asyncio.to_thread(service.eligible, r)
        view = await asyncio.to_thread(service.store.get_body_view, r.id) if r.body_sha256 else None
        return render("request.html", status, r=r, perms=perms, viewer=viewer,
                      eligible=eligible, routing_note=routing_note(r, eligible), body_view=view,
                      csrf_token=csrf_for(token), error=error, done=done,
                      path=f"/{r.service}/{r.method}", why_approval=MODE_EXPLANATIONS[r.mode],
                      approver_rule=approver_words(r), awaiting=awaiting_reason(r),
                      ttl=spoken_duration(r.approval_ttl), min_reason=config.policy.min_reason_length)

    @app.get("/requests/{request_id}", include_in_schema=False, response_class=HTMLResponse)
    async def page(request: Request, request_id: str, done: str = "") -> Response:
        viewer, token, why = who(request)
        if viewer is None or token is None:
            return login_needed(request, why)
        return await show(request, request_id, viewer, token, done=_DONE_WORDS.get(done, ""))

    async def act(request: Request, request_id: str, action: str) -> Response:
        async def refuse(viewer: Principal, token: str) -> Response:
            return await show(request, request_id, viewer, token, status=403, error=CSRF_REFUSED)
        posted = await posted_form(request, f"{action} on request {request_id}", refuse)
        if isinstance(posted, Response):
            return posted
        viewer, token, form = posted
        comment = str(form.get("comment", ""))
        try:
            if action == "approve":
                await asyncio.to_thread(service.approve, request_id, viewer.id, comment)
            elif action == "reject":
                await asyncio.to_thread(service.reject, request_id, viewer.id, comment)
            elif action == "cancel":
                await asyncio.to_thread(service.cancel, request_id, viewer.id, comment)
            else:
                await asyncio.to_thread(service.complete, request_id, viewer.id,
                                        reason=str(form.get("reason", "")),
                                        incident=str(form.get("incident", "")) or None)
        except PolicyError as e:
            from .api import status_of
            return await show(request, request_id, viewer, token, status=status_of(e),
                              error=f"Refused: {e}")
        except (UnknownRequest, StoreError):
            return await show(request, request_id, viewer, token)
        done = {"approve": "approved", "reject": "rejected", "cancel": "cancelled",
                "complete": "completed"}[action]
        return RedirectResponse(f"/requests/{request_id}?done={done}", status_code=303)

    from .inbox import add_inbox_routes
    add_inbox_routes(app, render=render, who=who, login_needed=login_needed, csrf_for=csrf_for,
                     posted_form=posted_form, broker=getattr(app.state, "broker", None))

    for _action in ("approve", "reject", "cancel", "complete"):
        async def handler(request: Request, request_id: str, _a: str = _action) -> Response:
            return await act(request, request_id, _a)
        app.add_api_route(f"/requests/{{request_id}}/{_action}", handler, methods=["POST"],
                          include_in_schema=False)

    # --- sign-in --------------------------------------------------------------------------
    @app.get("/login", include_in_schema=False, response_class=HTMLResponse)
    def login_form(next: str = "/") -> Response:
        if app.state.dev_issuer is None:
            return render("login.html", 200, dev_login=False, viewer=None)
        nonce = secrets.token_urlsafe(24)
        resp = render("login.html", 200, dev_login=True, viewer=None, login_csrf=nonce,
                      next=_safe_next(next))
        resp.set_cookie(LOGIN_CSRF_COOKIE, nonce, httponly=True, samesite="strict",
                        secure=config.cookies_secure(), path="/login", max_age=600)
        return resp

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        issuer = app.state.dev_issuer
        if issuer is None:
            return render("login.html", 404, dev_login=False, viewer=None)
        form = await request.form()
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        sent = str(form.get("csrf_token", ""))
        username = str(form.get("username", "")).strip()
        next_path = _safe_next(str(form.get("next", "/")))
        if not nonce or not hmac.compare_digest(sent, nonce):
            return render("login.html", 403, dev_login=True, viewer=None, login_csrf=nonce,
                          next=next_path, error="Refused: the form's CSRF token is missing or "
                                                "wrong. Reload the page and try again.")
        if not username or len(username) > 200 or any(c.isspace() for c in username):
            return render("login.html", 422, dev_login=True, viewer=None, login_csrf=nonce,
                          next=next_path, error="Type the engineer's id, e.g. bob@example.com.")
        token = issuer.mint(username, ttl_seconds=DEV_SESSION_SECONDS)
        log.info("dev login for %s (dev issuer; not for production)", username)
        resp = RedirectResponse(next_path, status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                        secure=config.cookies_secure(), path="/", max_age=DEV_SESSION_SECONDS)
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        token = session_token(request)
        form = await request.form()
        if token and not hmac.compare_digest(str(form.get("csrf_token", "")), csrf_for(token)):
            return render("message.html", 403, heading="Refused", viewer=None,
                          message="The form's CSRF token is missing or wrong.")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp
