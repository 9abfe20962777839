"""The compiled shadow matcher in the real Envoy binary: the shadow result, the effective
policy id (the access log's ``fast_path_policy``) and the shadow_allowed/shadow_denied
stats are what tests/support/fastpath_rbac.py says, for string, number, list, object and
missing claims (only a string claim can be allowed), other methods, query strings, approval
modes and unknown methods.

One Envoy, one listener per claim value: jwt_authn's metadata namespace filled by
set_metadata, the compiled RBAC config inline, a direct response."""
from __future__ import annotations

import json
import pathlib
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import json_format

from devstack.processes import EnvoyProcess, free_port
from fastpath.compile import MAX_EXACT_NAMES, RESOURCE_NAME, compile_policy
from fastpath.envoy_config import ACCESS_LOG_FIELDS, RE2_MAX_PROGRAM_SIZE
from policy import Grant, GrantSet, Mode, Role
from reflection_cache.types import ServiceModes
from tests.support.fastpath_rbac import shadow_allows

pytestmark = pytest.mark.envoy

SVC = "a.v1.S"
#: listener name -> the claim's JSON value (None: no sub claim at all)
CLAIMS: dict[str, Any] = {"alice": "alice", "bob": "bob", "carol": "carol", "num": 123,
                          "list": ["alice"], "obj": {"sub": "alice"}, "missing": None}
#: a.v1.ST shares a.v1.S's first characters: its contributors must not pass as a.v1.S's.
PATHS = [f"/{SVC}/Get", f"/{SVC}/Team", f"/{SVC}/Ask", f"/{SVC}/Nope", f"/{SVC}/Get?x=1", f"/{SVC}/Team/x",
         "/a.v1.ST/Team", "/b.v1.T/Get"]


def _listener(name: str, claim: Any, port: int, rbac: dict[str, Any], log: pathlib.Path) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(log), "log_format": {"json_format": {
                        **ACCESS_LOG_FIELDS, "listener": name, "path": "%REQ(:PATH)%", "method": "%REQ(:METHOD)%"}}}}],
                "http_filters": [
                    {"name": "envoy.filters.http.set_metadata", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                        "metadata": [{"metadata_namespace": "envoy.filters.http.jwt_authn",
                                      "value": {"jwt_payload": {} if claim is None else {"sub": claim}}}]}},
                    {"name": RESOURCE_NAME, "typed_config": rbac},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}}}]}]}


def test_the_compiled_matcher_in_envoy_allows_exactly_what_the_evaluator_says(tmp_path: pathlib.Path) -> None:
    modes = {SVC: ServiceModes(SVC, {"Get": Mode.ENGINEERS_WITHOUT_APPROVAL, "Team": Mode.CONTRIBUTORS_WITHOUT_APPROVAL,
                                     "Ask": Mode.ENGINEERS_WITH_APPROVAL}),
             "a.v1.ST": ServiceModes("a.v1.ST", {"Team": Mode.CONTRIBUTORS_WITHOUT_APPROVAL})}
    grants = [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER), Grant("bob", Role.CONTRIBUTOR, SVC),
              Grant("alice", Role.CONTRIBUTOR, "a.v1.ST"),
              Grant("123", Role.ENGINEER), Grant("carol", Role.CONTRIBUTOR, SVC)]
    # Enough engineers for an RE2 alternation; each service's contributors are exact matches.
    grants += [Grant(f"filler-{i}", Role.ENGINEER) for i in range(MAX_EXACT_NAMES)] + [Grant("dave", Role.CONTRIBUTOR, SVC), Grant("dave", Role.ENGINEER)]
    compiled = compile_policy(modes, GrantSet(grants), datetime.now(UTC), version="9",
                              default_mode=Mode.BREAK_GLASS_ONLY)
    rbac = json.loads(json_format.MessageToJson(compiled.rbac))
    rbac["@type"] = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    log = tmp_path / "access.log"
    taken: set[int] = set()
    while len(taken) < len(CLAIMS) + 1:  # free_port() may hand out a port twice
        taken.add(free_port())
    admin, *rest = sorted(taken)
    ports = dict(zip(CLAIMS, rest, strict=False))
    cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
           "layered_runtime": {"layers": [{"name": "re2", "static_layer": {
               "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE}}]},
           "static_resources": {"listeners": [_listener(n, c, ports[n], rbac, log) for n, c in CLAIMS.items()]}}
    envoy = EnvoyProcess(cfg, tmp_path, name="matcher").wait_ready()
    expected: dict[tuple[str, str, str], str | None] = {}
    try:
        for name, claim in CLAIMS.items():
            for path in PATHS:
                for method in ("POST", "GET"):
                    req = urllib.request.Request(f"http://127.0.0.1:{ports[name]}{path}",
                                                 data=b"x" if method == "POST" else None, method=method)
                    with urllib.request.urlopen(req, timeout=5) as r:
                        r.read()
                    expected[(name, method, path)] = shadow_allows(compiled.rbac, claim, path, method)
        stats = envoy.stats("http.")
    finally:
        envoy.stop()  # flushes the access log
    seen = {}
    for line in log.read_text().splitlines():
        e = json.loads(line)
        seen[(e["listener"], e["method"], e["path"])] = (e["fast_path"], e["fast_path_policy"])
    assert seen.keys() == expected.keys()
    for key, policy_id in expected.items():
        assert seen[key] == (("allowed", policy_id) if policy_id else ("denied", None)), key
    # Exactly these three are allowed, with the policy that allowed them.
    assert {k: v for k, v in expected.items() if v} == {
        ("alice", "POST", f"/{SVC}/Get"): "v9/engineers", ("bob", "POST", f"/{SVC}/Get"): "v9/engineers",
        ("bob", "POST", f"/{SVC}/Team"): "v9/contributors", ("alice", "POST", "/a.v1.ST/Team"): "v9/contributors"}
    for name in CLAIMS:
        allowed = sum(1 for (n, _m, _p), v in expected.items() if n == name and v)
        assert stats[f"http.{name}.rbac.rpcauthz_fast_.shadow_allowed"] == allowed
        assert stats[f"http.{name}.rbac.rpcauthz_fast_.shadow_denied"] == 2 * len(PATHS) - allowed
