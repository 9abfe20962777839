"""Through real Envoy with the shipped mTLS link: Envoy's Checks pass, a Check sent straight to
the ext_authz port with a forged jwt_authn payload is refused, spends nothing and audits nothing
in the victim's name (issue 9, finding 1). The scenario is the fault suite's
(tests/support/faults/forged_checks.py): plaintext and TLS without a client certificate get no
answer (UNAVAILABLE), a certificate of the right CA with another name is UNAUTHENTICATED with
that name in the reason."""
from __future__ import annotations

import pytest

from tests.support.faults.forged_checks import forged_checks

pytestmark = [pytest.mark.envoy]


def test_forged_direct_checks_are_refused_while_envoys_pass(tmp_path):
    result = forged_checks(tmp_path)
    print("\n" + result.report())
    assert not result.unmet(), result.report()
    assert result.calls == 5 and result.audit_written == 2
