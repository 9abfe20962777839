"""Where credential events go: the audit log (must succeed) and Slack (best effort).

Every credential request, review and fetch produces a :class:`policy.audit.AuditEvent`
(``credential.requested``, ``credential.approved``, ``request.rejected``, ``credential.fetched``).
Audit sinks are part of the operation: if the audit record cannot be written the broker
refuses the operation (no unaudited credentials). Notifiers (Slack) run after and their
failure is logged, not fatal: a Slack outage must not block incident response.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Protocol

from policy.audit import AuditEvent

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
    what = event.detail.get("target", "credentials")
    rid = event.request_id or "?"
    if event.kind == "credential.requested":
        reason = f": {event.reason}" if event.reason else ""
        incident = f" (incident {event.detail['incident']})" if event.detail.get("incident") else ""
        return f":key: {event.actor} requested {what}{incident}{reason} [request {rid}]"
    if event.kind == "credential.approved":
        return f":white_check_mark: {event.actor} approved {event.detail.get('requester', '?')}'s request for {what} [request {rid}]"
    if event.kind == "request.rejected":
        return f":no_entry: {event.actor} rejected {event.detail.get('requester', '?')}'s request for {what} [request {rid}]"
    if event.kind == "credential.fetched":
        return (f":unlock: {event.actor} fetched {what}, valid until {event.detail.get('expires_at', '?')} "
                f"[request {rid}]")
    return f"{event.kind} by {event.actor} [request {rid}]"


class SlackNotifier:
    """Posts :func:`slack_text` to a Slack incoming webhook (through the enclave's egress proxy)."""

    def __init__(self, webhook_url: str, *, timeout: float = 5.0,
                 opener: Callable[..., object] | None = None) -> None:
        if not webhook_url.startswith(("https://", "http://")):
            raise ValueError(f"Slack webhook must be an http(s) URL, got {webhook_url!r}")
        self._url = webhook_url
        self._timeout = timeout
        self._open = opener or urllib.request.urlopen

    def __call__(self, event: AuditEvent) -> None:
        body = json.dumps({"text": slack_text(event)}).encode()
        req = urllib.request.Request(self._url, data=body, headers={"Content-Type": "application/json"})
        with self._open(req, timeout=self._timeout) as resp:  # type: ignore[attr-defined]
            if resp.status >= 300:
                raise OSError(f"Slack answered HTTP {resp.status}")


def notify_all(notifiers: list[Callable[[AuditEvent], None]], event: AuditEvent) -> None:
    for notify in notifiers:
        try:
            notify(event)
        except Exception as e:  # best effort by design; see module docstring
            log.warning("notification for %s %s failed: %s", event.kind, event.request_id, e)
