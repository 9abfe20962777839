"""A service's reflection endpoint hangs, then answers garbage, under load through real Envoy:
once the cached answer expired, calls to that service are UNAVAILABLE (never an allow), calls
to the other service are unaffected, and the service's calls pass again within 5 s of the
endpoint's return. The scenario is the fault suite's
(tests/support/faults/reflection_faults.py); a relay in front of Ledger's reflection makes the
faults."""
from __future__ import annotations

import pytest

from tests.support.faults.reflection_faults import reflection_faults

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def test_reflection_hung_then_garbage_is_unavailable_never_allowed_and_recovers(tmp_path):
    results = reflection_faults(tmp_path, seconds=3)
    print("\n" + "\n".join(r.report() for r in results))
    assert [r.name for r in results] == ["reflection endpoint hung 3 s", "reflection endpoint returning garbage 3 s"]
    for r in results:
        assert not r.unmet(), r.report()
        assert r.unavailable > 0  # the fault was felt
