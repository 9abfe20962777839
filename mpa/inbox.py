"""The web inbox at ``/`` and the credential (broker) request pages at ``/credentials/{id}``.

The inbox has two lists, RPC requests and broker credential requests alike: *waiting for my
approval* (pending requests the viewer may approve now) and *my requests*. Each row links to its
page. Credential requests are read from the broker with the viewer's own token
(:mod:`mpa.broker_link`); when the broker cannot be reached the inbox says so instead of
pretending there is nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from policy import ApprovalRequest, StoreError

from .broker_link import BrokerLink, BrokerRefused, CredentialView, mode_explanation
from .page import CSRF_REFUSED


@dataclasses.dataclass(frozen=True)
class InboxRow:
    """One line of the inbox: what, who, state, and where its page is."""

    href: str
    kind: str          # "RPC" or "credential"
    what: str
    requester: str
    state: str
    reason: str
    expires: datetime | None


def rpc_row(r: ApprovalRequest) -> InboxRow:
    return InboxRow(f"/requests/{r.id}", "RPC", f"/{r.service}/{r.method}", r.requester,
                    r.state.value, r.reason or "(waiting for the reason)",
                    r.expires_at if r.state.value == "pending" else r.valid_until)


def credential_row(c: CredentialView) -> InboxRow:
    return InboxRow(f"/credentials/{c.id}", "credential", c.what, c.requester, c.state, c.reason,
                    c.expires_at if c.state == "pending" else c.valid_until)


def add_inbox_routes(app: FastAPI, *, render: Callable[..., HTMLResponse],
                     who: Callable[[Request], tuple[Any, str | None, str]],
                     login_needed: Callable[[Request, str], HTMLResponse],
                     csrf_for: Callable[[str], str],
                     posted_form: Callable[..., Awaitable[Any]], broker: BrokerLink | None) -> None:
    """Mount ``/``, ``/requests`` (to ``/``) and, with a broker, ``/credentials/{id}``.

    ``who``, ``login_needed``, ``csrf_for`` and ``posted_form`` (sign-in and the CSRF check of
    every form) are the approval page's (:mod:`mpa.page`), so both behave alike."""
    service = app.state.service

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def inbox(request: Request) -> Response:
        viewer, token, why = who(request)
        if viewer is None or token is None:
            return login_needed(request, why.replace("this request", "your inbox"))
        problems: list[str] = []
        status = 200
        waiting: list[InboxRow] = []
        mine: list[InboxRow] = []
        try:
            waiting += [rpc_row(r) for r in await asyncio.to_thread(
                service.list, viewer.id, scope="reviewable", limit=100)]
            mine += [rpc_row(r) for r in await asyncio.to_thread(
                service.list, viewer.id, scope="mine", limit=100)]
        except StoreError:
            status = 503
            problems.append("The approvals store is unavailable right now: RPC requests are "
                            "not shown. Try again shortly.")
        if broker is not None:
            try:
                waiting += [credential_row(c) for c in await asyncio.to_thread(broker.reviewable, token)]
                mine += [credential_row(c) for c in await asyncio.to_thread(broker.mine, token)]
            except BrokerRefused as e:
                problems.append(f"Credential requests are not shown: {e}")
        return render("inbox.html", status,
                      viewer=viewer, csrf_token=csrf_for(token), waiting=waiting, mine=mine,
                      problems=problems, broker=broker is not None)

    @app.get("/requests", include_in_schema=False)
    def requests_index() -> Response:
        return RedirectResponse("/", status_code=303)

    if broker is None:
        return

    async def show_credential(request: Request, request_id: str, viewer: Any, token: str, *,
                              status: int = 200, error: str = "", done: str = "") -> HTMLResponse:
        try:
            c = await asyncio.to_thread(broker.get, token, request_id)
            reviewable = {x.id for x in await asyncio.to_thread(broker.reviewable, token)}
        except BrokerRefused as e:
            heading = "No such request" if e.status == 404 else "Unavailable" if e.status == 503 else "Refused"
            return render("message.html", e.status, heading=heading, viewer=viewer,
                          csrf_token=csrf_for(token), message=str(e))
        can_review = c.id in reviewable
        if c.state != "pending":
            why_not = f"This request is {c.state}; it can no longer be approved or rejected."
        elif viewer.id == c.requester:
            why_not = ("You asked for this; nobody approves their own request. It needs "
                       f"{c.approver_rule}.")
        elif viewer.id in {a.approver for a in c.approvals}:
            why_not = "You already approved this request."
        elif not can_review:
            why_not = (f"You may not review this request: under {c.mode} the approver must be "
                       f"{c.approver_rule}.")
        else:
            why_not = ""
        return render("credential.html", status, c=c, viewer=viewer, csrf_token=csrf_for(token),
                      can_review=can_review and not why_not, why_not=why_not, error=error,
                      done=done, approver_rule=c.approver_rule,
                      why_approval=mode_explanation(c.mode))

    @app.get("/credentials/{request_id}", include_in_schema=False, response_class=HTMLResponse)
    async def credential_page(request: Request, request_id: str, done: str = "") -> Response:
        viewer, token, why = who(request)
        if viewer is None or token is None:
            return login_needed(request, why)
        words = {"approved": "Your approval is recorded.", "rejected": "You rejected this request."}
        return await show_credential(request, request_id, viewer, token, done=words.get(done, ""))

    async def review(request: Request, request_id: str, approve: bool) -> Response:
        async def refuse(viewer: Any, token: str) -> Response:
            return await show_credential(request, request_id, viewer, token, status=403,
                                         error=CSRF_REFUSED)
        posted = await posted_form(request, f"review of credential request {request_id}", refuse)
        if isinstance(posted, Response):
            return posted
        viewer, token, form = posted
        try:
            await asyncio.to_thread(broker.review, token, request_id, approve=approve,
                                    comment=str(form.get("comment", "")))
        except BrokerRefused as e:
            return await show_credential(request, request_id, viewer, token, status=e.status,
                                         error=f"Refused: {e}")
        done = "approved" if approve else "rejected"
        return RedirectResponse(f"/credentials/{request_id}?done={done}", status_code=303)

    @app.post("/credentials/{request_id}/approve", include_in_schema=False)
    async def approve_credential(request: Request, request_id: str) -> Response:
        return await review(request, request_id, True)

    @app.post("/credentials/{request_id}/reject", include_in_schema=False)
    async def reject_credential(request: Request, request_id: str) -> Response:
        return await review(request, request_id, False)


__all__ = ["InboxRow", "add_inbox_routes", "credential_row", "rpc_row"]
