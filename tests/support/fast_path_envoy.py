"""A STATIC Envoy fast path, for the ALS audit tests (issue 12).

``with_static_fast_path(cfg, policies)`` turns a rendered gateway config (``render_gateway``)
into the fast-path chain of the contract (/work/briefs/fastpath_contract.md): jwt_authn ->
RBAC with shadow rules only (``shadow_rules_stat_prefix: rpcauthz_fast_``) -> ext_authz,
which runs unless the RBAC shadow result is "allowed" -> router; plus the gRPC access log
(``rpcauthz_fast_path``) of fast-path allows to the ext_authz cluster. The policies are
written here by hand instead of coming over xDS, so the audit half can be tested on its own
(the shipped gateway, ``fastpath.envoy_config.with_fast_path``, is tested in tests/fastpath/).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

RBAC_FILTER = "envoy.filters.http.rbac"
STAT_PREFIX = "rpcauthz_fast_"
RESULT_KEY = f"{STAT_PREFIX}shadow_engine_result"
LOG_NAME = "rpcauthz_fast_path"


@dataclasses.dataclass(frozen=True)
class Policy:
    """One RBAC policy: these principals may call these paths. ``name`` is v<version>/<kind>[/svc]."""

    name: str
    principals: Sequence[str]
    paths: Sequence[str]


def rbac_policy(p: Policy, claim: str = "sub") -> dict[str, Any]:
    """The RBAC ``Policy`` message (as YAML-ready dict) for ``p``."""
    return {
        "permissions": [{"url_path": {"path": {"exact": path}}} for path in p.paths],
        "principals": [{"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                     "path": [{"key": "jwt_payload"}, {"key": claim}],
                                     "value": {"string_match": {"exact": who}}}}
                       for who in p.principals],
    }


def _allowed_matcher() -> dict[str, Any]:
    return {"filter": RBAC_FILTER, "path": [{"key": RESULT_KEY}],
            "value": {"string_match": {"exact": "allowed"}}}


def rbac_filter(policies: Iterable[Policy]) -> dict[str, Any]:
    """The shadow-only RBAC http filter holding ``policies``."""
    return {"name": RBAC_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "shadow_rules": {"action": "ALLOW", "policies": {p.name: rbac_policy(p) for p in policies}},
        "shadow_rules_stat_prefix": STAT_PREFIX}}


def with_static_fast_path(cfg: Mapping[str, Any], policies: Iterable[Policy], *,
                          flush_interval_s: float = 0.05, als: bool = True) -> dict[str, Any]:
    """``cfg`` with the fast path wired (see the module docstring); ``als=False`` leaves out the
    access log (to measure what it costs)."""
    out = copy.deepcopy(dict(cfg))
    hcm = out["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    at = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.jwt_authn") + 1
    filters.insert(at, rbac_filter(policies))
    for f in filters:
        if f["name"] == "envoy.filters.http.ext_authz":
            f["typed_config"]["filter_enabled_metadata"] = {**_allowed_matcher(), "invert": True}
    if als:
        hcm.setdefault("access_log", []).append({
            "name": "envoy.access_loggers.http_grpc",
            "filter": {"metadata_filter": {"matcher": _allowed_matcher(), "match_if_key_not_found": False}},
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": LOG_NAME, "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "ext_authz"}},
                    "buffer_flush_interval": f"{flush_interval_s}s"}}})
    return out
