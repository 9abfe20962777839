"""Edge case "mode changed to an approval mode", end to end through real Envoy.

A method is ENGINEERS_WITHOUT_APPROVAL and Envoy allows it on the fast path; then the service's
reflection (a real reflection server whose descriptors are swapped, as a redeploy would) starts
serving it as ENGINEERS_WITH_APPROVAL. The server's reflection cache (short TTL) is refreshed by
the fast-path publisher (fast-path calls no longer reach the cache), the policy is recompiled
without the method and pushed, and the next calls get ext_authz's approval-required answer
(PERMISSION_DENIED with the request link). Never a fast-path allow under a policy version once
a call under that version or an earlier one went to ext_authz; the lag from the swap is bounded
by the reflection TTL + 2 x modes_check_s + debounce + compile + push (docs/extauthz.md)."""
from __future__ import annotations

import time

import grpc
import pytest

from policy import Grant, Role
from tests.support.gateway_harness import ACCOUNTS, GatewayStack
from tests.support.reflection_servers import compile_proto, reflection_server

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

LIST = f"/{ACCOUNTS}/ListAccounts"
FAST = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"
VERSION = "extension_config_discovery.http_filter.rpcauthz_fast_path.version_text"
TTL_S, MODES_CHECK_S, DEBOUNCE_S = 1.0, 0.2, 0.05


def accounts_files(list_accounts_mode: int):
    """The demo's accounts.proto and its imports, ListAccounts carrying ``list_accounts_mode``."""
    from rpcauthz.v1 import options_pb2

    files = [type(f).FromString(f.SerializeToString())  # copies: compile_proto's are shared
             for f in compile_proto("rpcauthz/demo/v1/accounts.proto")]
    [accounts] = [f for f in files if f.name == "rpcauthz/demo/v1/accounts.proto"]
    [method] = [m for m in accounts.service[0].method if m.name == "ListAccounts"]
    method.options.Extensions[options_pb2.humans_who_can_rpc] = list_accounts_mode
    return files


def _envoy_state(gw: GatewayStack) -> tuple[int, str]:
    assert gw.envoy is not None
    s = gw.envoy.stats()
    return int(s.get(FAST, 0)), str(s.get(VERSION, ""))


def test_a_mode_changed_to_an_approval_mode_leaves_the_fast_path(tmp_path) -> None:
    from rpcauthz.v1 import options_pb2

    with reflection_server(accounts_files(options_pb2.ENGINEERS_WITHOUT_APPROVAL), [ACCOUNTS]) as refl, \
            GatewayStack(tmp_path, store_url=f"sqlite:///{tmp_path}/store.db",
                         grants=[Grant("alice", Role.ENGINEER)], fast_path=True,
                         reflection_static={ACCOUNTS: refl.address},
                         extauthz={"reflection.cache.ttl": TTL_S, "reflection.cache.stale_window": 60,
                                   "fast_path.modes_check_s": MODES_CHECK_S,
                                   "fast_path.debounce_s": DEBOUNCE_S}) as gw:
        # The first call teaches the server the mode (a Check); then Envoy allows it alone.
        deadline = time.monotonic() + 15
        while True:
            before, _ = _envoy_state(gw)
            r = gw.call(LIST, as_="alice")
            assert r.code is grpc.StatusCode.OK, r.render()
            if _envoy_state(gw)[0] > before:
                break
            assert time.monotonic() < deadline, "ListAccounts never took the fast path"
            time.sleep(0.05)

        refl.serve_files(accounts_files(options_pb2.ENGINEERS_WITH_APPROVAL))
        swapped = time.monotonic()
        #: policy version Envoy held around a call -> how calls under it were answered
        under: dict[str, set[str]] = {}
        first_checked: float | None = None
        checked_after = 0
        while checked_after < 10:
            fast_before, v_before = _envoy_state(gw)
            r = gw.call(LIST, as_="alice")
            fast_after, v_after = _envoy_state(gw)
            how = "fast" if fast_after > fast_before else "ext_authz"
            if v_before == v_after:
                under.setdefault(v_after, set()).add(how)
            if how == "fast":
                assert r.code is grpc.StatusCode.OK, r.render()
                assert first_checked is None, (
                    f"a fast-path allow under policy version {v_after} after ext_authz had answered "
                    f"under version {under}")
                waited = time.monotonic() - swapped
                assert waited < TTL_S + 2 * MODES_CHECK_S + 8, \
                    f"Envoy still allowed the approval-mode method {waited:.1f}s after the change"
                time.sleep(0.05)
                continue
            # ext_authz: the approval-mode answer, with the request link, every time from now on.
            assert r.code is grpc.StatusCode.PERMISSION_DENIED, r.render()
            assert r.request_url and "approval" in r.message.lower(), r.render()
            if first_checked is None:
                first_checked = time.monotonic() - swapped
            checked_after += 1
        # A policy version answered calls one way only: fast, or (once the mode left it) not.
        assert all(len(hows) == 1 for hows in under.values()), under
        print(f"mode change -> Envoy (reflection TTL {TTL_S}s, modes_check_s {MODES_CHECK_S}s, "
              f"debounce {DEBOUNCE_S}s): {first_checked:.2f}s")
        assert first_checked is not None and first_checked >= 0
