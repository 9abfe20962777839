"""Who called a service's RPCs by hand recently, and what each mode would have done to them.

The numbers come from the gateway's ``decision.*`` audit events (one per authorised call
attempt). ``summarize`` is pure; ``load_usage`` reads a store. ``mpactl usage`` prints
``render_usage``; ``mpactl migrate`` shows one line of it per RPC to help owners choose.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from policy import GrantSet, Mode, Outcome, Target, decide
from policy.audit import AuditEvent

#: The audit kinds that record one call attempt at the gateway.
DECISION_KINDS = ("decision.allow", "decision.allow_with_approval", "decision.deny",
                  "decision.approval_required", "decision.error")

REAL_MODES = tuple(m for m in Mode if m is not Mode.UNSPECIFIED)


@dataclasses.dataclass
class MethodUsage:
    """Calls to one RPC: how many, by whom, when last, and how they were decided."""

    method: str
    calls: int = 0
    by_engineer: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    last_call: datetime | None = None

    @property
    def engineers(self) -> int:
        return len(self.by_engineer)

    def line(self) -> str:
        """One human sentence, as ``migrate`` shows it."""
        if not self.calls:
            return "no calls by hand in the window"
        last = self.last_call.strftime("%Y-%m-%d %H:%M UTC") if self.last_call else "?"
        return (f"{self.calls} call{'s' if self.calls != 1 else ''} by {self.engineers} "
                f"engineer{'s' if self.engineers != 1 else ''}, last {last}")


def method_name(raw: str | None) -> str | None:
    """The bare method name from ``Method``, ``/pkg.Svc/Method`` or ``pkg.Svc.Method``."""
    if not raw:
        return None
    return raw.replace("/", ".").rstrip(".").rsplit(".", 1)[-1] or None


def summarize(events: Iterable[AuditEvent], service: str) -> dict[str, MethodUsage]:
    """Per-method usage of ``service`` from decision audit events (other events ignored)."""
    out: dict[str, MethodUsage] = {}
    for e in events:
        if e.kind not in DECISION_KINDS or e.service != service:
            continue
        name = method_name(e.method)
        if name is None:
            continue
        u = out.setdefault(name, MethodUsage(name))
        u.calls += 1
        u.by_engineer[e.actor] += 1
        u.outcomes[e.kind.removeprefix("decision.")] += 1
        at = e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)
        if u.last_call is None or at > u.last_call:
            u.last_call = at
    return out


def would_have(usage: MethodUsage, service: str, grants: GrantSet, now: datetime,
               modes: Iterable[Mode] = REAL_MODES) -> dict[Mode, dict[str, int]]:
    """For each mode: how many of these calls it would allow / need approval for / deny.

    Judged with today's grants and no approvals, by the real ``policy.decide``.
    """
    target = Target(service, usage.method)
    result: dict[Mode, dict[str, int]] = {}
    for mode in modes:
        counts = {o.value: 0 for o in Outcome}
        for who, n in usage.by_engineer.items():
            counts[decide(who, target, mode, grants, (), now).outcome.value] += n
        result[mode] = counts
    return result


def load_usage(store, service: str, *, days: float = 30, now: datetime | None = None,
               limit: int = 100_000) -> dict[str, MethodUsage]:
    """Read ``service``'s decision events of the last ``days`` from a ``policy.store.Store``."""
    now = now or datetime.now(UTC)
    events = store.list_audit(since=now - timedelta(days=days), kinds=list(DECISION_KINDS),
                              service=service, limit=limit)
    if len(events) >= limit:
        import warnings
        warnings.warn(f"usage of {service}: read only the first {limit} events of the window; "
                      "use a shorter --days for exact numbers", stacklevel=2)
    return summarize(events, service)


def render_usage(service: str, usage: Mapping[str, MethodUsage], methods: Iterable[str] = (),
                 grants: GrantSet | None = None, now: datetime | None = None,
                 days: float = 30) -> str:
    """The ``mpactl usage`` report: per RPC, per engineer, and what each mode would do."""
    now = now or datetime.now(UTC)
    names = list(dict.fromkeys([*methods, *sorted(usage)]))
    lines = [f"{service}: calls by hand in the last {days:g} days"]
    if not names:
        lines.append("  no calls recorded")
    for name in names:
        u = usage.get(name, MethodUsage(name))
        lines.append(f"  {name}: {u.line()}")
        if not u.calls:
            continue
        outcome_text = ", ".join(f"{k} {v}" for k, v in sorted(u.outcomes.items()))
        lines.append(f"    decided: {outcome_text}")
        for who, n in u.by_engineer.most_common():
            lines.append(f"    {who}: {n}")
        if grants is not None:
            for mode, counts in would_have(u, service, grants, now).items():
                parts = [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v]
                lines.append(f"    under {mode.name}: {', '.join(parts)}")
    return "\n".join(lines)


def usage_json(service: str, usage: Mapping[str, MethodUsage], methods: Iterable[str] = (),
               grants: GrantSet | None = None, now: datetime | None = None,
               days: float = 30) -> dict:
    """The ``mpactl usage --json`` report: the same facts as :func:`render_usage`, as data.

    ``{service, days, methods: [{method, calls, engineers: {who: calls}, outcomes: {outcome: n},
    last_call, would_have: {MODE: {allow, approval_required, deny}} | null}]}``; ``would_have``
    is null without grants (no store).
    """
    now = now or datetime.now(UTC)
    rows = []
    for name in dict.fromkeys([*methods, *sorted(usage)]):
        u = usage.get(name, MethodUsage(name))
        rows.append({
            "method": name, "calls": u.calls, "engineers": dict(u.by_engineer.most_common()),
            "outcomes": dict(sorted(u.outcomes.items())),
            "last_call": u.last_call.isoformat() if u.last_call else None,
            "would_have": None if grants is None or not u.calls else
            {mode.name: dict(counts) for mode, counts in would_have(u, service, grants, now).items()},
        })
    return {"service": service, "days": days, "methods": rows}
