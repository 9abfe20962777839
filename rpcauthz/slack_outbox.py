"""Slack's outbox: a durable local spool of messages and the thread that delivers them.

Shared by the approvals service (``mpa.slack``) and the enclave broker
(``enclave_bridge.broker.notify``). Messages go into a SQLite spool (one insert, keyed so a
repeated event adds nothing); a delivery thread posts due messages to an incoming webhook with a
short timeout and retries failures with exponential backoff and jitter (honouring
``Retry-After`` on 429). A message stays in the spool until Slack has accepted it.

A post is resent only when it surely did not arrive (no connection, an error status). A webhook
that took the whole message and then answers slowly is waited for (``answer_timeout``, 30 s by
default), not resent after a short timeout: that gave duplicate posts. If even that passes, the
message is marked delivered with the doubt recorded (``last_error``) and logged, since Slack has
no idempotency key and a resend could post it twice.

The webhook URL is a secret (it is the credential): it is never logged, never stored in the
spool, and errors are recorded without it.
"""
from __future__ import annotations

import http.client
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("rpcauthz.slack_outbox")

#: How ``_post`` marks a post that may have arrived (sent whole, never answered).
_MAYBE = "maybe delivered"


def escape_mrkdwn(text: str) -> str:
    """Slack mrkdwn escaping: user text can never mention @channel or forge a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackSpool:
    """Messages waiting for Slack, in a local SQLite file (safe across threads and restarts)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS slack_outbox (
            key TEXT PRIMARY KEY, payload TEXT NOT NULL, created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
            delivered_at REAL, last_error TEXT NOT NULL DEFAULT '')""")

    def enqueue(self, key: str, payload: dict[str, Any]) -> bool:
        """Add a message unless one with ``key`` exists; True if added."""
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO slack_outbox (key, payload, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?)", (key, json.dumps(payload), now, now))
            return cur.rowcount == 1

    def due(self, now: float, limit: int = 20) -> list[tuple[str, dict[str, Any], int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, payload, attempts FROM slack_outbox WHERE delivered_at IS NULL "
                "AND next_attempt_at <= ? ORDER BY created_at LIMIT ?", (now, limit)).fetchall()
        return [(k, json.loads(p), a) for k, p, a in rows]

    def delivered(self, key: str, doubt: str = "") -> None:
        """Slack took ``key`` (``doubt``: it probably did, but never said so)."""
        with self._lock:
            self._db.execute("UPDATE slack_outbox SET delivered_at = ?, attempts = attempts + 1, "
                             "last_error = ? WHERE key = ?", (time.time(), doubt, key))

    def failed(self, key: str, error: str, retry_at: float) -> None:
        with self._lock:
            self._db.execute("UPDATE slack_outbox SET attempts = attempts + 1, last_error = ?, "
                             "next_attempt_at = ? WHERE key = ?", (error, retry_at, key))

    def keys(self, delivered: bool | None = None) -> list[str]:
        """Message keys in the spool (all, or only delivered / undelivered ones), oldest first."""
        where = "" if delivered is None else (
            " WHERE delivered_at IS NOT NULL" if delivered else " WHERE delivered_at IS NULL")
        with self._lock:
            return [k for (k,) in self._db.execute(
                f"SELECT key FROM slack_outbox{where} ORDER BY created_at")]

    def counts(self) -> dict[str, int]:
        """{"pending": n, "delivered": n} for health checks and tests."""
        with self._lock:
            pending, delivered = self._db.execute(
                "SELECT COUNT(*) FILTER (WHERE delivered_at IS NULL), "
                "COUNT(*) FILTER (WHERE delivered_at IS NOT NULL) FROM slack_outbox").fetchone()
        return {"pending": pending, "delivered": delivered}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def unescape_mrkdwn(mrkdwn: str) -> str:
    return mrkdwn.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


class SlackDelivery:
    """Posts spooled messages to the webhook in a background thread, with backoff."""

    def __init__(self, spool: SlackSpool, webhook_url: str, *, timeout: float = 5.0,
                 base_backoff: float = 1.0, max_backoff: float = 300.0, poll: float = 0.5,
                 answer_timeout: float = 30.0) -> None:
        """Any JSON webhook that answers 2xx works (Slack, PagerDuty Events v2). ``timeout``
        bounds connecting and sending; ``answer_timeout`` the wait for the answer once the whole
        message was sent (see the module docstring). Set ``prepare`` to add what must not be
        spooled (e.g. a routing key) just before posting."""
        if not webhook_url.startswith(("https://", "http://")):
            raise ValueError("the Slack webhook URL must be an http(s) URL")
        self.spool = spool
        self._url = webhook_url
        self.timeout = timeout
        self.answer_timeout = answer_timeout
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.poll = poll
        self.prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never show the secret
        return "SlackDelivery(webhook=<redacted>)"

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failures (exponential, jittered)."""
        delay = min(self.max_backoff, self.base_backoff * (2 ** max(0, attempts - 1)))
        return delay * random.uniform(0.8, 1.2)

    def deliver_due(self) -> int:
        """Try every due message once; returns how many Slack accepted."""
        sent = 0
        for key, payload, attempts in self.spool.due(time.time()):
            if self._stop.is_set():
                break
            ok, error, retry_after = self._post(payload)
            if ok:
                self.spool.delivered(key)
                sent += 1
            elif error.startswith(_MAYBE):
                self.spool.delivered(key, doubt=error)
                log.warning("Slack took %s but did not answer within %.0fs; not sending it again "
                            "(Slack may have posted it)", key, self.answer_timeout)
            else:
                wait = max(retry_after or 0.0, self.backoff(attempts + 1))
                self.spool.failed(key, error, time.time() + wait)
                log.warning("Slack delivery of %s failed (%s); retry %d in %.1fs",
                            key, error, attempts + 1, wait)
        return sent

    def _post(self, payload: dict[str, Any]) -> tuple[bool, str, float | None]:
        if self.prepare is not None:
            payload = self.prepare(payload)
        # http.client rather than a client library: nothing here may log the URL (the secret),
        # and sending and waiting for the answer need different timeouts.
        url = urlsplit(self._url)
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname or "", url.port, timeout=self.timeout)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            try:
                conn.request("POST", path, body=json.dumps(payload).encode(),
                             headers={"Content-Type": "application/json"})
            except OSError as e:  # refused, unreachable, send timeout: Slack did not take it
                return False, f"unreachable ({type(e).__name__})", None
            if conn.sock is not None:
                conn.sock.settimeout(self.answer_timeout)
            try:
                resp = conn.getresponse()
                resp.read()
            except TimeoutError:
                # The whole message went out; only the answer is missing. Resending could post twice.
                return False, f"{_MAYBE}: no answer within {self.answer_timeout:g}s", None
            except (OSError, http.client.HTTPException) as e:
                return False, f"{type(e).__name__}", None
        finally:
            conn.close()
        if resp.status >= 400:
            retry = resp.getheader("Retry-After")
            try:
                retry_after = float(retry) if retry else None
            except ValueError:
                retry_after = None
            return False, f"HTTP {resp.status}", retry_after
        return True, "", None

    def start(self) -> SlackDelivery:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.deliver_due()
                except Exception as e:  # the spool itself failed; keep trying
                    log.error("Slack delivery loop error: %s", type(e).__name__)
                self._wake.wait(self.poll)
                self._wake.clear()
        self._thread = threading.Thread(target=run, name="slack-delivery", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=self.timeout + 2)
