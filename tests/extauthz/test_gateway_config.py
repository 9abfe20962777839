"""Invariants of envoy/gateway.yaml that keep the gateway failing closed.

An operator tuning the file must not be able to quietly turn an outage into an allow,
skip the check for some paths, or let a later filter re-route after the check.
"""
from __future__ import annotations

import yaml

from devstack.processes import GATEWAY_YAML
from extauthz.config import Settings

CFG = yaml.safe_load(GATEWAY_YAML.read_text())
HCM = CFG["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
FILTERS = {f["name"]: f["typed_config"] for f in HCM["http_filters"]}
EXT = FILTERS["envoy.filters.http.ext_authz"]
DEFAULTS = Settings(store_url="sqlite:///x.db")


def _seconds(text: str) -> float:
    assert text.endswith("s")
    return float(text[:-1])


def test_filter_order_is_jwt_then_ext_authz_then_router():
    assert [f["name"] for f in HCM["http_filters"]] == [
        "envoy.filters.http.jwt_authn", "envoy.filters.http.ext_authz", "envoy.filters.http.router"]


def test_ext_authz_fails_closed_and_visibly():
    assert EXT["failure_mode_allow"] is False
    assert EXT["status_on_error"]["code"] == "ServiceUnavailable"
    assert EXT.get("clear_route_cache", False) is False
    assert EXT["transport_api_version"] == "V3"


def test_timeouts_are_layered():
    envoy_timeout = _seconds(EXT["grpc_service"]["timeout"])
    assert envoy_timeout * 1000 > DEFAULTS.decision_deadline_ms > DEFAULTS.reflection.cache.deadline * 1000


def test_identity_reaches_the_server():
    assert "envoy.filters.http.jwt_authn" in EXT["metadata_context_namespaces"]
    providers = FILTERS["envoy.filters.http.jwt_authn"]["providers"]
    assert {p["payload_in_metadata"] for p in providers.values()} == {DEFAULTS.identity.payload_key}
    assert all(p.get("forward", False) is False for p in providers.values())
    rules = FILTERS["envoy.filters.http.jwt_authn"]["rules"]
    assert rules[0]["match"] == {"prefix": "/"} and "provider_name" in rules[0]["requires"]


def test_body_is_never_authorized_on_a_prefix():
    body = EXT["with_request_body"]
    assert body["allow_partial_message"] is False and body["pack_as_bytes"] is True


def test_every_path_meets_a_route_so_ext_authz_runs():
    routes = HCM["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["match"] == {"prefix": "/"}
    assert HCM["normalize_path"] is False and HCM["merge_slashes"] is False


def test_access_log_records_the_decision():
    fmt = HCM["access_log"][0]["typed_config"]["log_format"]["json_format"]
    for key in ("decision_id", "outcome", "mode", "rule", "principal"):
        assert fmt[key] == f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{key})%"
