"""The one table of mode facts agrees with README's mode table, and every rule is worded."""
from __future__ import annotations

import pathlib
import re
import string
from datetime import UTC, datetime

import pytest

from policy import Grant, GrantSet, Mode, Outcome, Role, Target, decide
from policy.mode_facts import MODE_FACTS
from policy.rules import WORDING, Rule, explain

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
NOW = datetime(2026, 12, 1, tzinfo=UTC)
T = Target("acme.v1.Billing", "Refund")


def readme_mode_table() -> dict[str, tuple[str, str, str]]:
    text = README.read_text()
    section = text.split("## The five modes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([A-Z_]+)` \| (.*) \|$", line)
        if m:
            cells = tuple(c.strip() for c in m.group(2).split(" | "))
            rows[m.group(1)] = cells
    return rows


def test_table_is_readmes_mode_table_word_for_word():
    rows = readme_mode_table()
    assert set(rows) == {m.name for m in MODE_FACTS}, "a mode is missing from README or the table"
    for mode, facts in MODE_FACTS.items():
        assert facts.mode is mode
        assert rows[mode.name] == (facts.outright, facts.with_approval, facts.approver), mode.name


def test_roles_agree_with_the_words():
    for mode, f in MODE_FACTS.items():
        assert (f.callers is None) == (f.outright == "nobody"), mode
        assert (f.requesters is None) == (f.with_approval == "-") == (f.approver == "-"), mode
        assert mode.needs_approval is f.needs_approval
        assert f.incident_required == ("incident" in f.with_approval), mode
        if f.needs_approval:
            assert f.explanation.startswith(f"{mode.name}: ") and f.role_words and f.needs
            assert f.approver_advice and f.approver_rule
    assert not Mode.UNSPECIFIED.needs_approval and Mode.UNSPECIFIED not in MODE_FACTS


def test_decide_names_the_tables_rules():
    someone = GrantSet([Grant("eve", Role.ENGINEER)])
    for mode, f in MODE_FACTS.items():
        d = decide("eve", T, mode, someone, (), NOW)
        expected = {Outcome.ALLOW: f.allow_rule, Outcome.DENY: f.not_eligible_rule,
                    Outcome.APPROVAL_REQUIRED: f.approval_required_rule}[d.outcome]
        assert d.rule is expected and d.mode is mode


def test_every_rule_is_worded_and_every_placeholder_is_a_known_fact():
    assert set(WORDING) == set(Rule)
    facts = {"principal": "eve", "target": T, "mode": Mode.BREAK_GLASS_ONLY, "detail": "why",
             "request_id": "r1", "approvers": "bob", "http_method": "GET", "size": 9, "limit": 4,
             "op": "find_requests", "deadline_ms": 800, "decision_id": "d1",
             "decided_rule": "x.y", "decided_message": "m", "decided_advice": "a",
             "policy_id": "v1/engineers"}
    for rule, wording in WORDING.items():
        for text in (wording.message, wording.advice):
            if isinstance(text, str):
                names = {f for _, f, _, _ in string.Formatter().parse(text) if f}
                assert names <= set(facts) | {"service", "role_words", "needs", "approver_advice",
                                              "incident_words"}, rule
        message, _advice = explain(rule, facts)
        assert message and "{" not in message, rule


@pytest.mark.parametrize("rule", list(Rule))
def test_rule_ids_are_dotted_lowercase(rule):
    assert re.fullmatch(r"[a-z_]+\.[a-z_]+", rule.value)
