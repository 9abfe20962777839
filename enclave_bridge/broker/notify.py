"""Where credential events go: the audit log (must succeed) and Slack (durable, never blocking).

Every credential request, review and fetch produces a :class:`policy.audit.AuditEvent`
(``credential.requested``, ``credential.approved``, ``request.rejected``, ``credential.fetched``).
Audit sinks are part of the operation: if the audit record cannot be written the broker
refuses the operation (no unaudited credentials). Notifiers run after; their failure is logged,
not fatal: a Slack outage must not block incident response.

Slack goes through the approvals service's durable spool (:mod:`mpa.slack`): the
:class:`SpooledSlackNotifier` inserts each message into a SQLite :class:`mpa.slack.SlackSpool`
and a :class:`mpa.slack.SlackDelivery` thread posts it, retrying with backoff until Slack
accepts it, across Slack outages and broker restarts. The webhook URL is never logged or spooled.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from policy.audit import AuditEvent
from rpcauthz.slack_outbox import SlackDelivery, SlackSpool, escape_mrkdwn

log = logging.getLogger(__name__)


class AuditSink(Protocol):
    def __call__(self, event: AuditEvent) -> None: ...


class JsonlAuditLog:
    """Appends one JSON object per line to ``path`` (on the host, shipped to the security pipeline)."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        line = json.dumps(event.to_json(), sort_keys=True) + "\n"
        with self._lock, self._path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


class MemoryAuditLog(list):
    """Keeps events in a list (tests, and the demo's ``mpactl broker`` output)."""

    def __call__(self, event: AuditEvent) -> None:
        self.append(event)


def slack_text(event: AuditEvent) -> str:
    """The one-line Slack message for a credential event."""
    what = escape_mrkdwn(str(event.detail.get("target", "credentials")))
    rid = event.request_id or "?"
    if event.kind == "credential.requested":
        reason = f": {escape_mrkdwn(event.reason)}" if event.reason else ""
        incident = f" (incident {escape_mrkdwn(str(event.detail['incident']))})" if event.detail.get("incident") else ""
        return f":key: {event.actor} requested {what}{incident}{reason} [request {rid}]"
    if event.kind == "credential.approved":
        return f":white_check_mark: {event.actor} approved {event.detail.get('requester', '?')}'s request for {what} [request {rid}]"
    if event.kind == "request.rejected":
        return f":no_entry: {event.actor} rejected {event.detail.get('requester', '?')}'s request for {what} [request {rid}]"
    if event.kind == "credential.fetched":
        return (f":unlock: {event.actor} fetched {what}, valid until {event.detail.get('expires_at', '?')} "
                f"[request {rid}]")
    return f"{event.kind} by {event.actor} [request {rid}]"


_HEADERS = {"credential.requested": "Credentials requested", "credential.approved": "Credentials approved",
            "request.rejected": "Credential request rejected", "credential.fetched": "Credentials fetched",
            "request.approval_recorded": "Approval recorded"}


def slack_payload(event: AuditEvent) -> dict[str, object]:
    """The webhook payload for a credential event: Block Kit like the approvals service's
    (:mod:`mpa.slack`), with :func:`slack_text` (escaped) as the notification fallback."""
    text = slack_text(event)
    rid = escape_mrkdwn(event.request_id or "?")
    fields = [{"type": "mrkdwn", "text": f"*Requester*\n{escape_mrkdwn(str(event.detail.get('requester', '?')))}"},
              {"type": "mrkdwn", "text": f"*Credentials*\n{escape_mrkdwn(str(event.detail.get('target', '?')))}"}]
    if event.detail.get("incident"):
        fields.append({"type": "mrkdwn", "text": f"*Incident*\n{escape_mrkdwn(str(event.detail['incident']))}"})
    if event.kind == "credential.fetched" and event.detail.get("expires_at"):
        fields.append({"type": "mrkdwn", "text": f"*Valid until*\n{escape_mrkdwn(str(event.detail['expires_at']))}"})
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _HEADERS.get(event.kind, event.kind)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "section", "fields": fields},
    ]
    if event.kind == "credential.requested" and event.reason:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Reason*\n>{escape_mrkdwn(event.reason)}"}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Broker request {rid}: "
                                                    f"`mpa broker review {rid}`"}]})
    return {"text": text, "blocks": blocks}


class SpooledSlackNotifier:
    """Notifier that spools :func:`slack_payload` for each event in an :class:`mpa.slack.SlackSpool`.

    One local SQLite insert per event (keyed, so a repeated event adds nothing); ``delivery``, if
    given, is woken to post it at once. Nothing here talks to Slack or blocks on it.
    """

    def __init__(self, spool: SlackSpool, delivery: SlackDelivery | None = None) -> None:
        self.spool = spool
        self.delivery = delivery

    def __call__(self, event: AuditEvent) -> None:
        key = (f"broker:{event.kind}:{event.request_id}:{event.actor}:"
               f"{event.detail.get('state_counter', '')}:{event.at.isoformat()}")
        self.spool.enqueue(key, slack_payload(event))
        if self.delivery is not None:
            self.delivery.wake()


class BrokerSlack:
    """The broker's Slack wiring: a spool file, its delivery thread and the notifier feeding it."""

    def __init__(self, webhook_url: str, spool_path: str | Path, **delivery_options: float) -> None:
        """``delivery_options`` are :class:`mpa.slack.SlackDelivery`'s (timeout, base_backoff, ...)."""
        self.spool = SlackSpool(str(spool_path))
        try:
            self.delivery = SlackDelivery(self.spool, webhook_url, **delivery_options)
        except ValueError:
            self.spool.close()
            raise
        self.notifier = SpooledSlackNotifier(self.spool, self.delivery)

    def __repr__(self) -> str:  # never show the webhook
        return f"BrokerSlack(spool={self.spool.path!r}, webhook=<redacted>)"

    def start(self) -> BrokerSlack:
        self.delivery.start()
        return self

    def close(self) -> None:
        self.delivery.close()
        self.spool.close()


def notify_all(notifiers: list[Callable[[AuditEvent], None]], event: AuditEvent) -> None:
    for notify in notifiers:
        try:
            notify(event)
        except Exception as e:  # best effort by design; see module docstring
            log.warning("notification for %s %s failed: %s", event.kind, event.request_id, e)
