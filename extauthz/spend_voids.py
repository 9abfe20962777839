"""Giving back approval uses spent for checks that were not answered allow.

A check that spends an approval use does so in a store transaction. If the store hangs
while that transaction commits and the check's deadline passes, the check answers 503
without knowing whether the use was spent (the two generals: nothing the gateway sees then
can tell it). So every check that attempted a spend and did not end in an allow records a
*void* for its decision id, durably (in the audit spool, in the same fsync'd group commit as
the check's ``decision.error`` event, before the 503 goes out), and the shipper applies it
once the store answers again: ``Store.void_spend`` gives the use back if the spend committed
(audited ``request.use_voided``), and otherwise leaves a tombstone so that a spend still in
flight for that decision can never commit. Applying a void twice changes nothing.

Eventually, then, uses spent == calls answered allow, and the audit holds one decision event
per check: ``decision.allow_with_approval`` is written by the gateway only for an allow;
the store's ``request.used`` / ``request.use_voided`` events are the request's ledger.

A process killed (kill -9) after its spend committed and before the check was answered records
no void. So, with the spool, a check first records a *spend intent* for its decision id (fsync'd,
before the spend is sent); its allow settles the intent in the same spool transaction as the
allow's events, a void settles it too; an intent its process left unsettled becomes a void
(``AuditSpool.void_orphaned_intents``: at the next start, or by another process on the spool).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from policy.store import Store

log = logging.getLogger("extauthz.audit")

#: The actor of the store's ``request.use_voided`` events.
ACTOR = "rpcauthz-gateway"


@dataclasses.dataclass(frozen=True, slots=True)
class SpendVoid:
    """A check (``decision_id``) that attempted to spend an approval use and was not allowed."""

    decision_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class SpendIntent:
    """A check (``decision_id``) is about to send a spend to the store (recorded durably first)."""

    decision_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class SpendSettled:
    """A check (``decision_id``) that recorded a spend intent is answered allow."""

    decision_id: str


def apply_voids(store: Store, decision_ids: Iterable[str],
                on_given_back: Callable[[], None] | None = None) -> list[str]:
    """Apply each void to ``store`` (blocking), in order; returns the decision ids applied.
    ``on_given_back`` is called for each void that gave a spent use back (a metric).
    Stops at the first store failure (the rest wait for the next round) by raising it after
    the caller has had the chance to forget what was applied: see ``VoidsFailed``."""
    done: list[str] = []
    for decision_id in decision_ids:
        try:
            given_back = store.void_spend(decision_id, actor=ACTOR,
                                          reason=f"check {decision_id} was not answered allow")
        except Exception as e:
            raise VoidsFailed(done, e) from e
        if given_back is not None:
            log.warning("approval %s: use given back, its check %s was not answered allow (now %d use(s))",
                        given_back.id, decision_id, given_back.uses)
            if on_given_back is not None:
                on_given_back()
        done.append(decision_id)
    return done


class VoidsFailed(Exception):
    """The store failed while applying voids; ``done`` were applied before it did."""

    def __init__(self, done: list[str], cause: Exception) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.done, self.cause = done, cause


__all__ = ["ACTOR", "SpendIntent", "SpendSettled", "SpendVoid", "VoidsFailed", "apply_voids"]
