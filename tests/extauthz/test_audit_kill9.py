"""kill -9 loses no acknowledged decision (issue 9, finding 4): the server, a real process on
PostgreSQL with the audit spool, answers N checks, is killed with SIGKILL while their events are
still inside the batch window (2 s), and is started again on the same spool: every one of the N
decisions is then in the store's audit exactly once. The scenario is the fault suite's
(tests/support/faults/server_kill9.py)."""
from __future__ import annotations

import pytest

from tests.support.faults.server_kill9 import server_kill9, server_kill9_mid_spend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.mark.parametrize("spool_fsync", [True, False], ids=["fsync", "no-fsync"])
def test_kill_9_after_answers_loses_no_decision_audit(tmp_path, pg_dsn, spool_fsync):
    result = server_kill9(tmp_path, pg_dsn, checks=40, spool_fsync=spool_fsync)
    print("\n" + result.report())
    assert not result.unmet(), result.report()
    assert (result.audit_expected, result.audit_written, result.audit_duplicated) == (40, 40, 0)


def test_kill_9_between_a_spend_and_its_answer_gives_the_use_back(tmp_path, pg_dsn):
    """The spend committed, the server was killed -9 before answering: the spend intent it
    spooled becomes a void at the restart, so uses spent == calls passed."""
    result = server_kill9_mid_spend(tmp_path, pg_dsn)
    print("\n" + result.report())
    assert not result.unmet(), result.report()
    assert (result.uses_spent, result.uses_passed) == (1, 1)
