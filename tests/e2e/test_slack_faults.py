"""Slack's webhook is down, then slow, while engineers work through real Envoy and the approvals
service: requests are opened by the gateway, reasoned, approved and used as without the fault,
the plain load is unaffected, API answers stay fast, and once Slack is back every message is
delivered exactly once (none lost, none posted twice). The scenario is the fault suite's
(tests/support/faults/slack_faults.py)."""
from __future__ import annotations

import pytest

from tests.support.faults.slack_faults import slack_faults

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def test_slack_down_then_slow_leaves_decisions_alone_and_posts_each_message_once(tmp_path):
    down, slow = slack_faults(tmp_path, seconds=3)
    print("\n" + down.report() + "\n" + slow.report())
    for r in (down, slow):
        assert not r.unmet(), r.report()
        assert r.uses_spent == r.uses_passed == 2
