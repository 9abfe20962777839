"""The allow-response template cache is bounded and never empties itself at once."""
from __future__ import annotations

from extauthz import responses
from extauthz.verdict import Kind, Verdict
from policy import Mode, Target
from policy.rules import Rule


def _allow(principal: str) -> Verdict:
    return Verdict(Kind.ALLOW, f"d-{principal}", Rule.ENGINEERS_WITHOUT_APPROVAL_ENGINEER,
                   principal=principal, target=Target("pay.v1.Pay", "Get"),
                   mode=Mode.ENGINEERS_WITHOUT_APPROVAL)


def test_full_cache_drops_its_oldest_quarter(monkeypatch):
    monkeypatch.setattr(responses, "_MAX_TEMPLATES", 8)
    monkeypatch.setattr(responses, "_ALLOW_TEMPLATES", {})
    sizes = []
    for i in range(40):
        v = _allow(f"user{i}@example.com")
        resp = responses.build(v)
        assert resp == responses._build_allow(v, v.decision_id)  # each check gets its own answer
        sizes.append(len(responses._ALLOW_TEMPLATES))
    assert max(sizes) == 8 and min(sizes[8:]) >= 6  # bounded, and never emptied
    held = {k[0] for k in responses._ALLOW_TEMPLATES}
    assert "user39@example.com" in held and "user0@example.com" not in held
