"""User-made requests learn the method's mode from the service itself (real reflection)."""
from __future__ import annotations

import pytest

from devstack.demo_services import start_demo_server
from mpa.service import lazy_modes
from policy import Mode
from reflection_cache.cache import ReflectionCache
from reflection_cache.endpoints import EndpointResolver
from tests.conftest import free_port
from tests.support.approvals_env import approvals_env

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
A = "alice@example.com"


@pytest.fixture
def demo():
    server = start_demo_server(services=("accounts",))
    try:
        yield server
    finally:
        server.stop(grace=0)


def test_mode_comes_from_reflection_and_failures_never_guess(tmp_path, demo):
    dead = f"127.0.0.1:{free_port()}"
    lookup = lazy_modes(lambda: ReflectionCache(EndpointResolver(
        static={ACCOUNTS: demo.address, "gone.v1": dead})), Mode.BREAK_GLASS_ONLY)
    with approvals_env(tmp_path, mode_lookup=lookup) as env:
        def ask(service, method):
            return env.call("POST", "/api/v1/requests", A, json={
                "service": service, "method": method, "reason": "investigating ticket 4411"})
        ok = ask(ACCOUNTS, "ReadAccount")
        assert ok.status_code == 201, ok.text
        assert ok.json()["mode"] == Mode.ENGINEERS_WITH_APPROVAL.name
        open_mode = ask(ACCOUNTS, "ListAccounts")  # ENGINEERS_WITHOUT_APPROVAL: nothing to approve
        assert open_mode.status_code == 422 and "takes no approvals" in open_mode.json()["error"]["message"]
        missing = ask(ACCOUNTS, "NoSuchMethod")
        assert missing.status_code == 422 and "NoSuchMethod" in missing.json()["error"]["message"]
        down = ask("gone.v1.Service", "Anything")
        assert down.status_code == 503 and down.json()["error"]["code"] == "mode_unavailable"
        assert len(env.store.find_requests(requester=A)) == 1
