"""One scenario's numbers and goals, and the suite's table of them."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Goal:
    """A goal the scenario must meet, e.g. ``Goal("zero wrong allows", wrong == 0, "0 of 812")``."""

    name: str
    met: bool
    detail: str = ""


@dataclasses.dataclass
class ScenarioResult:
    """What one fault scenario measured. ``None`` means "not measured in this scenario"."""

    name: str
    calls: int = 0
    wrong_allows: int = 0
    unavailable: int = 0
    recovery_s: float | None = None
    audit_expected: int | None = None
    audit_written: int | None = None
    audit_duplicated: int | None = None
    uses_spent: int | None = None
    uses_passed: int | None = None
    detail: list[str] = dataclasses.field(default_factory=list)
    goals: list[Goal] = dataclasses.field(default_factory=list)

    def goal(self, name: str, met: bool, detail: str = "") -> None:
        self.goals.append(Goal(name, bool(met), detail))

    def unmet(self, *, except_: Iterable[str] = ()) -> list[Goal]:
        """Goals not met (leaving out those named in ``except_``)."""
        skip = set(except_)
        return [g for g in self.goals if not g.met and g.name not in skip]

    @property
    def unavailable_share(self) -> float:
        return self.unavailable / self.calls if self.calls else 0.0

    def row(self) -> list[str]:
        audit = ("-" if self.audit_expected is None else
                 f"{self.audit_expected} / {self.audit_written} / {self.audit_duplicated}")
        uses = "-" if self.uses_spent is None else f"{self.uses_spent} / {self.uses_passed}"
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        met = sum(g.met for g in self.goals)
        return [self.name, str(self.calls), str(self.wrong_allows),
                f"{self.unavailable} ({self.unavailable_share:.1%})", recovery, audit, uses,
                f"{met}/{len(self.goals)}" + ("" if met == len(self.goals) else " FAIL")]

    def report(self) -> str:
        """The scenario's detail: what happened and each goal."""
        lines = [f"## {self.name}"] + [f"  {d}" for d in self.detail]
        lines += [f"  [{'ok' if g.met else 'NOT MET'}] {g.name}" + (f": {g.detail}" if g.detail else "")
                  for g in self.goals]
        return "\n".join(lines)


HEADER = ["scenario", "calls sent", "wrong allows", "UNAVAILABLE", "recovery s",
          "audit expected / written / duplicated", "uses spent / calls passed", "goals met"]


def table(results: Iterable[ScenarioResult]) -> str:
    """A Markdown table, one row per scenario."""
    rows = [HEADER, ["---"] * len(HEADER)] + [r.row() for r in results]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)
