"""Slack notifications through an incoming webhook, from a durable local spool.

The notifier is an audit exporter: it turns request events into Block Kit messages and puts
them in a SQLite spool (one insert, keyed so a repeated event adds nothing). A separate
delivery thread posts due messages to the webhook with a short timeout and retries failures
with exponential backoff and jitter (honouring ``Retry-After`` on 429). Decisions never wait
for Slack, and a message stays in the spool until Slack has accepted it.

The webhook URL is a secret (it is the credential): it is never logged, never stored in the
spool, and errors are recorded without it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from policy import ApprovalRequest, GrantSet, UnknownRequest, eligible_approvers
from policy.audit import AuditEvent
from policy.store import Store
from rpcauthz.slack_outbox import SlackSpool, escape_mrkdwn

from .service import MODE_EXPLANATIONS, awaiting_reason, routing_note, utcnow

#: At most this many reviewers are mentioned by name in one message.
MAX_MENTIONS = 15

#: Slack refuses a section whose text is over 3000 characters; the call shown gets at most this.
CALL_TEXT_CAP = 2800

log = logging.getLogger("mpa.slack")

_KINDS = {"request.created", "request.completed", "request.approval_recorded",
          "request.approved", "request.rejected", "request.expired", "request.cancelled"}


class SlackNotifier:
    """Audit exporter: request events become spooled Block Kit messages."""

    def __init__(self, store: Store, spool: SlackSpool, link: Callable[[str], str],
                 user_ids: Mapping[str, str] | None = None) -> None:
        """``user_ids`` maps principals to Slack member ids, so the requester is notified by
        an @-mention (``<@U123>``); unmapped people are named in plain text."""
        self.store = store
        self.spool = spool
        self.link = link
        self.user_ids = dict(user_ids or {})
        for principal, member in self.user_ids.items():
            if not re.fullmatch(r"[UW][A-Z0-9]{2,20}", member):
                raise ValueError(f"Slack member id for {principal} must look like U0123ABCD, not {member!r}")

    def _who(self, principal: str) -> str:
        member = self.user_ids.get(principal)
        return f"<@{member}>" if member else escape_mrkdwn(principal)

    def export(self, events: Sequence[AuditEvent]) -> None:
        for e in events:
            if e.kind not in _KINDS or not e.request_id:
                continue
            try:
                r = self.store.get_request(e.request_id)
            except UnknownRequest:
                continue
            message = self.message_for(e, r)
            if message is not None:
                key, payload = message
                self.spool.enqueue(key, payload)

    def message_for(self, e: AuditEvent, r: ApprovalRequest) -> tuple[str, dict[str, Any]] | None:
        """(dedupe key, webhook payload) for one event, or None when nobody needs telling."""
        link = self.link(r.id)
        rpc = f"/{r.service}/{r.method}"
        if e.kind in ("request.created", "request.completed"):
            if awaiting_reason(r) or not r.reason:
                return None  # gateway-opened: reviewers hear of it once the requester says why
            return f"new:{r.id}", self._new_request(r, rpc, link)
        if not r.reason:
            return None  # never announced (the requester never said why): nothing to follow up
        who = self._who(e.actor)
        requester = self._who(r.requester)
        if e.kind == "request.approval_recorded":
            text = (f"{who} approved {requester}'s request for `{rpc}` "
                    f"({len(r.approvals)} of {r.required_approvals} approvals)")
            key = f"approval:{r.id}:{e.actor}"
        elif e.kind == "request.approved":
            names = ", ".join(self._who(a.approver) for a in r.approvals)
            until = r.valid_until.strftime("%Y-%m-%d %H:%M UTC") if r.valid_until else "?"
            text = (f":white_check_mark: Approved by {names}: {requester}, your call to `{rpc}` "
                    f"is allowed until {until}.")
            key = f"approved:{r.id}"
        elif e.kind == "request.rejected":
            why = f": {escape_mrkdwn(r.close_reason)}" if r.close_reason else ""
            text = f":x: Rejected by {who}{why}. {requester}, your request for `{rpc}` was refused."
            key = f"rejected:{r.id}"
        elif e.kind == "request.expired":
            text = (f":hourglass: {requester}, your request for `{rpc}` expired "
                    f"({escape_mrkdwn(r.close_reason or 'expired')}).")
            key = f"expired:{r.id}:{'approved' if r.valid_until else 'pending'}"
        else:  # cancelled
            verb = "withdrawn by" if e.actor == r.requester else "revoked by"
            text = f":no_entry: {requester}'s request for `{rpc}` was {verb} {who}."
            key = f"cancelled:{r.id}"
        # The top-level text (notifications, clients without blocks) is mrkdwn too: escaped
        # the same way, so a reason can never ping @channel or forge a link there either.
        return key, {"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Request {r.id[:8]}>"}]},
        ]}

    def _new_request(self, r: ApprovalRequest, rpc: str, link: str) -> dict[str, Any]:
        fields = [
            {"type": "mrkdwn", "text": f"*Requester*\n{escape_mrkdwn(r.requester)}"},
            {"type": "mrkdwn", "text": f"*RPC*\n`{rpc}`"},
            {"type": "mrkdwn", "text": f"*Mode*\n{r.mode.name}"},
            {"type": "mrkdwn", "text": f"*Expires*\n{r.expires_at.strftime('%Y-%m-%d %H:%M UTC')}"},
        ]
        if r.incident:
            fields.append({"type": "mrkdwn", "text": f"*Incident*\n{escape_mrkdwn(r.incident)}"})
        if r.body_sha256:
            fields.append({"type": "mrkdwn", "text": f"*Scope*\nbody sha256 `{r.body_sha256[:16]}…`"})
        view = self.store.get_body_view(r.id) if r.body_sha256 else None
        eligible = eligible_approvers(r, GrantSet(self.store.list_grants()), utcnow())
        if eligible:
            names = ", ".join(self._who(p) for p in eligible[:MAX_MENTIONS])
            more = len(eligible) - MAX_MENTIONS
            reviewers = f"*Can approve*: {names}" + (f" and {more} more" if more > 0 else "")
        else:
            reviewers = ""
        note = routing_note(r, eligible)
        if note:
            reviewers = (reviewers + "\n" if reviewers else "") + f":warning: {escape_mrkdwn(note)}"
        need = f"{r.required_approvals} approvals" if r.required_approvals > 1 else "1 approval"
        return {
            "text": f"{escape_mrkdwn(r.requester)} asks for approval to call {rpc}: {escape_mrkdwn(r.reason)}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "Approval requested"}},
                {"type": "section", "text": {"type": "mrkdwn", "text":
                    f"*{escape_mrkdwn(r.requester)}* asks to call `{rpc}` ({need} needed). "
                    f"{escape_mrkdwn(MODE_EXPLANATIONS[r.mode])}"}},
                {"type": "section", "fields": fields},
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*Reason*\n>{escape_mrkdwn(r.reason)}"}},
                *([{"type": "section", "text": {"type": "mrkdwn", "text": reviewers}}] if reviewers else []),
                *([call_section(view)] if view else []),
                {"type": "actions", "elements": [{
                    "type": "button", "style": "primary", "url": link, "action_id": "open_request",
                    "text": {"type": "plain_text", "text": "Review request"}}]},
            ]}


def call_section(view: str) -> dict[str, Any]:
    """The *The call* section of a new-request message: the request's decoded, redacted call
    (``policy.body_view``) in a code block, escaped so it can neither mention nor link, unable
    to close its code block early, and cut (saying so) to fit Slack's section limit."""
    head, tail = "*The call*\n```", "```"
    safe = escape_mrkdwn(view).replace("```", "`\u200b`\u200b`")
    room = CALL_TEXT_CAP - len(head) - len(tail)
    if len(safe) > room:
        note = f"\n... (cut for Slack: {len(view)} characters in all; the request page shows the call)"
        cut = safe[:room - len(note)]
        amp = cut.rfind("&")
        if amp != -1 and ";" not in cut[amp:]:
            cut = cut[:amp]  # never end inside an escaped &amp; / &lt; / &gt;
        safe = cut + note
    return {"type": "section", "text": {"type": "mrkdwn", "text": head + safe + tail}}
