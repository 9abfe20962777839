"""The store interface every adapter (SQLite, PostgreSQL) implements.

Adapters are synchronous and thread-safe; async callers use ``asyncio.to_thread``.
Any failure to reach or read the store raises ``StoreError`` (never a default answer).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Protocol

from .audit import AuditEvent
from .grant_delta import GrantDelta
from .model import ApprovalRequest, Grant, RequestState, Role

#: A pure transition from policy.decide (approve, reject, cancel, use, expire...).
Transition = Callable[[ApprovalRequest], ApprovalRequest]


@dataclasses.dataclass(frozen=True)
class GrantDiff:
    """What ``replace_grants`` changed."""

    added: tuple[Grant, ...] = ()
    removed: tuple[Grant, ...] = ()


class Subscription(Protocol):
    def close(self) -> None: ...


class Store(Protocol):
    """Grants, approval requests and audit events, durably."""

    # --- grants ---------------------------------------------------------------------------
    def list_grants(self) -> list[Grant]:
        """Every grant, expired ones included (the GrantSet checks expiry at decision time)."""

    def grants_revision(self) -> int:
        """A number that increases whenever any grant changes."""

    def put_grant(self, grant: Grant, *, actor: str = "system") -> None:
        """Insert or replace the grant with the same (principal, role, service)."""

    def delete_grant(self, principal: str, role: str | Role, service: str | None = None, *,
                     actor: str = "system") -> bool:
        """Remove one grant; True if it existed."""

    def replace_grants(self, source: str, grants: Iterable[Grant], *, actor: str = "system",
                       digest: str | None = None) -> GrantDiff:
        """Atomically make the grants whose ``source`` is ``source`` exactly ``grants``
        (recording ``digest`` of their input with the resulting revision)."""

    def sync_digest(self, source: str) -> tuple[str, int] | None:
        """(digest, revision) recorded by the last ``replace_grants`` of ``source`` with a digest."""

    def load_grants(self, pause: Callable[[], None] | None = None) -> tuple[int, list[Grant]]:
        """(revision, every grant) from one consistent snapshot; ``pause`` runs between batches."""

    def grant_changes_since(self, revision: int) -> GrantDelta | None:
        """The changes from ``revision`` to now from the change log; ``None`` if the log no
        longer reaches back to ``revision`` (reload everything then)."""

    def watch_grants(self, on_change: Callable[[int], None]) -> Subscription:
        """Call ``on_change(revision)`` soon after any grant changes, from any process."""

    def watch_grant_deltas(self, on_delta: Callable[[GrantDelta], None]) -> Subscription:
        """Call ``on_delta`` soon after any grant change, from any process, with the change
        (or, when not carried, just the new revision: read ``grant_changes_since`` then)."""

    # --- approval requests ----------------------------------------------------------------
    def create_request(self, request: ApprovalRequest, *, actor: str) -> ApprovalRequest:
        """Store a new request and its ``request.created`` audit event in one transaction."""

    def get_or_create_pending(self, request: ApprovalRequest, *, actor: str) -> tuple[ApprovalRequest, bool]:
        """Return the open pending request with the same requester and scope, or create ``request``.

        Concurrent callers with the same scope end with one request. Returns (request, created).
        """

    def get_request(self, request_id: str) -> ApprovalRequest:
        """Raises ``UnknownRequest`` if there is none."""

    def find_requests(self, *, requester: str | None = None, service: str | None = None,
                      method: str | None = None, states: Sequence[RequestState] | None = None,
                      limit: int = 100) -> list[ApprovalRequest]:
        """Requests matching every given filter, newest first."""

    def due_requests(self, now: datetime, *, limit: int = 1000) -> list[ApprovalRequest]:
        """Pending requests past ``expires_at`` and approved ones past ``valid_until`` (indexed)."""

    def update_request(self, request_id: str, change: Transition, *, actor: str,
                       kind: str, reason: str = "") -> ApprovalRequest:
        """Atomically read, apply ``change``, write, and append an audit event of ``kind``.

        The row is locked for the duration, so two reviewers approving at once, or two
        calls spending the last use, end in one consistent state. If ``change`` raises
        (a ``PolicyError``), nothing is written and the error propagates.
        """

    def spend_use(self, request_id: str, change: Transition, *, decision_id: str, actor: str,
                  reason: str = "") -> ApprovalRequest:
        """Spend one use (``change`` is ``policy.use``) for the gateway's check ``decision_id``,
        recorded with that decision id and a ``request.used`` event in one transaction.
        Raises ``SpendVoided`` if the decision was voided first (nothing spent)."""

    def void_spend(self, decision_id: str, *, actor: str, reason: str = "") -> ApprovalRequest | None:
        """The check ``decision_id`` was not answered allow: give back its use if its spend
        committed (``request.use_voided``; returns the request), else make sure it never does
        (None). Idempotent; waits for a spend of that decision still in flight."""

    def put_body_view(self, request_id: str, view: str) -> None:
        """Keep the approver's view (decoded, redacted JSON) of a body-bound request's call."""

    def get_body_view(self, request_id: str) -> str | None:
        """The view ``put_body_view`` kept for ``request_id``, or None."""

    # --- audit ----------------------------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None:
        """Write one audit event durably."""

    def append_audits(self, events: Sequence[AuditEvent]) -> None:
        """Write several audit events durably, in one transaction."""

    def list_audit(self, *, since: datetime | None = None, kinds: Sequence[str] | None = None,
                   service: str | None = None, request_id: str | None = None,
                   limit: int = 1000) -> list[AuditEvent]:
        """Audit events, oldest first."""

    # --- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int:
        """The schema version recorded in the database."""

    def close(self) -> None: ...
