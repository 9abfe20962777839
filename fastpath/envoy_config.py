"""The gateway's Envoy pieces for the fast path, as bootstrap dicts (docs/extauthz.md).

``with_fast_path(bootstrap)`` turns a gateway bootstrap (``envoy/gateway.yaml``, or what
``mpactl envoy render`` makes) into its fast-path variant:

    jwt_authn -> header_mutation (drop client x-rpcauthz-*) -> rbac (ECDS rpcauthz_fast_path,
    over ADS from the ext_authz cluster; default: the empty policy) -> ext_authz (made only
    when the RBAC shadow result is not "allowed": ``gated_ext_authz``) -> router

With ``shards`` > 1 the policy comes in parts, one ECDS resource each, and the RBAC filter
is a dispatch that runs the caller's part (``dispatch_filter``):

    header_mutation -> jwt_authn (sets x-rpcauthz-principal to the claim) -> rpcauthz_fast_path
    (composite: the RBAC filter of part xxHash64(claim) % shards) -> ext_authz (gated) -> router

plus, on every virtual host, the upstream headers ext_authz sets on an allow, filled from
metadata when the fast path allowed (``x-rpcauthz-principal``: the verified claim;
``x-rpcauthz-decision-id``: the RBAC policy id, e.g. ``v17/engineers``, never a 32-hex
decision id), the ADS source, a node id and the RE2 program-size runtime limits; and the
audit of fast-path allows: an ``http_grpc`` access log (``LOG_NAME``, the server's
``fast_path.log_name``) to the ext_authz cluster, passing only entries whose RBAC shadow
result is "allowed" (extauthz/access_log.py turns each into one decision audit event).
With ``audit_file=PATH`` the same entries go instead to Envoy's file access log at ``PATH``,
one JSON line each (``audit_file_log``; about a fifth of ALS's cost in Envoy), which the
server tails (``fast_path.audit_file``, extauthz/file_audit.py). Only Envoy may write that
file: a writer could forge audit records of allows (never an allow itself).
"""
from __future__ import annotations

import copy
from typing import Any

from .compile import RESOURCE_NAME, SHADOW_PREFIX, empty_policy, shard_names

RBAC_NAMESPACE = "envoy.filters.http.rbac"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
#: The gateway's node metadata key of what it was rendered for (``with_fast_path``).
NODE_METADATA_KEY = "rpcauthz_fast_path"
#: Dynamic metadata the RBAC filter writes (namespace ``envoy.filters.http.rbac``).
SHADOW_RESULT_KEY = f"{SHADOW_PREFIX}shadow_engine_result"
SHADOW_POLICY_KEY = f"{SHADOW_PREFIX}shadow_effective_policy_id"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
JWT_FILTER = "envoy.filters.http.jwt_authn"
HEADER_PREFIX = "x-rpcauthz-"
PRINCIPAL_HEADER = "x-rpcauthz-principal"
DECISION_HEADER = "x-rpcauthz-decision-id"
#: RE2 programs of the compiled alternations are far above Envoy's default limit (100).
RE2_MAX_PROGRAM_SIZE = 4_000_000
#: The ``log_name`` of the access log of fast-path allows (the server's ``fast_path.log_name``).
LOG_NAME = "rpcauthz_fast_path"
HTTP_GRPC_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
#: Envoy sends a worker's buffered entries when this much time has passed or the buffer holds
#: ``AUDIT_BUFFER_BYTES`` (whichever comes first). Larger means fewer, bigger messages (less CPU
#: per entry on both sides) but more entries held in Envoy's memory, lost if Envoy dies.
AUDIT_FLUSH_INTERVAL_S = 1.0
#: About 1,000 entries of ~1 KiB (Envoy's default is 16 KiB: a flush every ~16 calls).
AUDIT_BUFFER_BYTES = 1 << 20


#: Access-log fields: the fast path's answer and the policy (version) that allowed.
ACCESS_LOG_FIELDS = {
    "fast_path": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_RESULT_KEY})%",
    "fast_path_policy": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_POLICY_KEY})%",
}


def _config_discovery(initial_fetch_timeout: str) -> dict[str, Any]:
    """An RBAC config from ECDS over ADS; until (and unless) one arrives, or once Envoy drops
    it (TTL), the empty policy applies: every call to ext_authz."""
    return {
        "config_source": {"ads": {}, "resource_api_version": "V3",
                          "initial_fetch_timeout": initial_fetch_timeout},
        "default_config": {"@type": RBAC_TYPE, "shadow_rules": {"action": "ALLOW"},
                           "shadow_rules_stat_prefix": empty_policy().shadow_rules_stat_prefix},
        "apply_default_config_without_warming": True,
        "type_urls": [RBAC_TYPE],
    }


def rbac_filter(*, initial_fetch_timeout: str = "0s") -> dict[str, Any]:
    """The RBAC filter, its config (the whole policy) from ECDS over ADS; until (and unless)
    one arrives, or once Envoy drops it (TTL), the empty policy applies: every call to ext_authz."""
    return {"name": RESOURCE_NAME, "config_discovery": _config_discovery(initial_fetch_timeout)}


CONSISTENT_HASHING_TYPE = ("type.googleapis.com/envoy.extensions.matching.input_matchers."
                           "consistent_hashing.v3.ConsistentHashing")
HEADER_INPUT_TYPE = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"


def dispatch_filter(shards: int, *, initial_fetch_timeout: str = "0s") -> dict[str, Any]:
    """The fast path with the policy in ``shards`` parts: Envoy's composite filter (named
    ``RESOURCE_NAME``, so routes disable it as they would the RBAC filter) runs, for each
    call, the RBAC filter of the one part the caller's claim hashes to, its config from ECDS
    (``shard_names``). The claim comes from ``PRINCIPAL_HEADER``, which jwt_authn sets from
    the verified token (``with_fast_path``); the hash is Envoy's ``consistent_hashing``
    matcher (xxHash64 modulo ``shards``: ``fastpath.compile.shard_of``). No header (no
    verified claim): no RBAC filter runs, no shadow result, and ext_authz decides."""
    names = shard_names(shards)
    # Part k where hash % shards >= k, from the top: the first that matches is the part.
    matchers = [{
        "predicate": {"single_predicate": {
            "input": {"name": PRINCIPAL_HEADER, "typed_config": {
                "@type": HEADER_INPUT_TYPE, "header_name": PRINCIPAL_HEADER}},
            "custom_match": {"name": "shard", "typed_config": {
                "@type": CONSISTENT_HASHING_TYPE, "threshold": k, "modulo": shards}}}},
        "on_match": {"action": {"name": names[k], "typed_config": {
            "@type": EXECUTE_FILTER_TYPE, "dynamic_config": {
                "name": names[k], "config_discovery": _config_discovery(initial_fetch_timeout)}}}},
    } for k in range(shards - 1, -1, -1)]
    return {
        "name": RESOURCE_NAME,
        "typed_config": {
            "@type": WITH_MATCHER_TYPE,
            "extension_config": {"name": "rpcauthz_fast_path_dispatch", "typed_config": {"@type": COMPOSITE_TYPE}},
            "xds_matcher": {"matcher_list": {"matchers": matchers}},
        },
    }


def claim_to_header(jwt_authn: dict[str, Any], claim: str) -> None:
    """Have every provider of ``jwt_authn`` (a filter entry) that puts its payload in
    metadata also set ``PRINCIPAL_HEADER`` to the verified ``claim`` (what
    ``dispatch_filter`` hashes). Raises ``ValueError`` if none does."""
    providers = jwt_authn.get("typed_config", {}).get("providers", {})
    wired = 0
    for provider in providers.values():
        if not provider.get("payload_in_metadata"):
            continue
        headers = [h for h in provider.get("claim_to_headers", []) if h.get("header_name") != PRINCIPAL_HEADER]
        provider["claim_to_headers"] = [*headers, {"header_name": PRINCIPAL_HEADER, "claim_name": claim}]
        wired += 1
    if not wired:
        raise ValueError("the sharded fast path needs a jwt_authn provider with payload_in_metadata "
                         "(its claim is the header the shards are chosen by)")


def audit_access_log(*, log_name: str = LOG_NAME, cluster: str = "ext_authz",
                     flush_interval_s: float = AUDIT_FLUSH_INTERVAL_S,
                     buffer_size_bytes: int = AUDIT_BUFFER_BYTES) -> dict[str, Any]:
    """The ``http_grpc`` access log of fast-path allows (entries whose RBAC shadow result is
    "allowed", i.e. calls ext_authz did not see) to ``cluster``, named ``log_name``."""
    if flush_interval_s <= 0:
        raise ValueError(f"flush_interval_s must be positive, got {flush_interval_s}")
    if buffer_size_bytes < 1:
        raise ValueError(f"buffer_size_bytes must be positive, got {buffer_size_bytes}")
    if not log_name.strip():
        raise ValueError("log_name must not be empty")
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {
            "matcher": {"filter": RBAC_NAMESPACE, "path": [{"key": SHADOW_RESULT_KEY}],
                        "value": {"string_match": {"exact": "allowed"}}},
            "match_if_key_not_found": False}},
        "typed_config": {
            "@type": HTTP_GRPC_LOG_TYPE,
            "common_config": {
                "log_name": log_name, "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                "buffer_flush_interval": f"{flush_interval_s:g}s",
                "buffer_size_bytes": buffer_size_bytes}},
    }


FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def audit_file_fields(node_id: str, *, metadata_namespace: str = JWT_FILTER, payload_key: str = "jwt_payload",
                      claim: str = "sub") -> dict[str, str]:
    """The ``json_format`` of one fast-path allow in the file access log: what its audit
    event and event id need (extauthz/file_audit.py reads exactly these keys). Envoy has no
    formatter for its node id: it is written in, from the bootstrap's ``node.id``."""
    return {
        "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%6fZ)%",
        "principal": f"%DYNAMIC_METADATA({metadata_namespace}:{payload_key}:{claim})%",
        "path": "%REQ(:PATH)%",
        "fast_path": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_RESULT_KEY})%",
        "policy_id": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_POLICY_KEY})%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "stream_id": "%STREAM_ID%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "node": node_id,
    }


def audit_file_log(path: str, node_id: str, *, claim: str = "sub") -> dict[str, Any]:
    """Envoy's file access log of fast-path allows at ``path``: the same filter as
    ``audit_access_log``, one JSON line per entry (``audit_file_fields``)."""
    if not path.strip():
        raise ValueError("audit_file must not be empty")
    return {
        "name": "envoy.access_loggers.file",
        "filter": copy.deepcopy(audit_access_log()["filter"]),
        "typed_config": {
            "@type": FILE_LOG_TYPE, "path": path,
            "log_format": {"json_format": audit_file_fields(node_id, claim=claim)}},
    }


def strip_filter() -> dict[str, Any]:
    """Removes every client-sent ``x-rpcauthz-*`` header before anything else may set one.

    Needed on the fast path: ext_authz removes them on its path (``headers_to_remove``),
    but a fast-path allow never reaches ext_authz, and the virtual host's
    ``request_headers_to_add`` overwrites only the two headers it sets (a client's
    ``x-rpcauthz-approval`` would reach the upstream). No formatter: a prefix scan only."""
    return {
        "name": "rpcauthz_strip_client_headers",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [
                {"remove_on_match": {"key_matcher": {"prefix": HEADER_PREFIX}}}]},
        },
    }


COMPOSITE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
WITH_MATCHER_TYPE = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
EXECUTE_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
METADATA_INPUT_TYPE = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput"
METADATA_MATCHER_TYPE = "type.googleapis.com/envoy.extensions.matching.input_matchers.metadata.v3.Metadata"


def gated_ext_authz(ext_authz: dict[str, Any]) -> dict[str, Any]:
    """The ext_authz filter entry ``ext_authz`` (name and typed_config), created only for
    requests whose RBAC shadow result is not "allowed": Envoy's composite filter, matched on
    that metadata, makes the ext_authz filter for those requests alone. A missing result
    does not match "allowed", so ext_authz runs. ``filter_enabled_metadata`` on a plain
    ext_authz filter decides the same, but inside a filter Envoy makes for every request:
    ~39,000 more instructions of Envoy per fast-path allow (bench/envoy_instructions.py)."""
    inner = copy.deepcopy(ext_authz)
    not_allowed = {"not_matcher": {"single_predicate": {
        "input": {"name": "rbac_shadow_result", "typed_config": {
            "@type": METADATA_INPUT_TYPE, "filter": RBAC_NAMESPACE, "path": [{"key": SHADOW_RESULT_KEY}]}},
        "custom_match": {"name": "allowed", "typed_config": {
            "@type": METADATA_MATCHER_TYPE, "value": {"string_match": {"exact": "allowed"}}}}}}}
    return {
        "name": inner["name"],
        "typed_config": {
            "@type": WITH_MATCHER_TYPE,
            "extension_config": {"name": "rpcauthz_ext_authz_gate",
                                 "typed_config": {"@type": COMPOSITE_TYPE}},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": not_allowed,
                "on_match": {"action": {"name": "ext_authz", "typed_config": {
                    "@type": EXECUTE_FILTER_TYPE,
                    "typed_config": {"name": inner["name"], "typed_config": inner["typed_config"]}}}},
            }]}},
        },
    }


def fast_path_headers(metadata_namespace: str = JWT_FILTER, payload_key: str = "jwt_payload",
                      claim: str = "sub") -> list[dict[str, Any]]:
    """Upstream headers on a fast-path allow. Empty values are not added, so on the
    ext_authz path these leave ext_authz's own headers as they are (the principal is the
    same claim on both paths)."""
    return [
        {"header": {"key": PRINCIPAL_HEADER,
                    "value": f"%DYNAMIC_METADATA({metadata_namespace}:{payload_key}:{claim})%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "keep_empty_value": False},
        {"header": {"key": DECISION_HEADER,
                    "value": f"%DYNAMIC_METADATA({RBAC_NAMESPACE}:{SHADOW_POLICY_KEY})%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "keep_empty_value": False},
    ]


def with_fast_path(bootstrap: dict[str, Any], *, xds_cluster: str = "ext_authz",
                   node_id: str = "rpcauthz-gateway", claim: str = "sub", log_name: str = LOG_NAME,
                   audit_flush_interval_s: float = AUDIT_FLUSH_INTERVAL_S,
                   audit_buffer_bytes: int = AUDIT_BUFFER_BYTES, audit_file: str | None = None,
                   shards: int = 1, delta_xds: bool = True) -> dict[str, Any]:
    """A copy of ``bootstrap`` with the fast path wired into every HTTP connection manager
    that has the ext_authz filter, each with the access log of its fast-path allows to
    ``xds_cluster`` (the ext_authz server, which audits them), or with ``audit_file`` to that
    file instead (``audit_file_log``; the server's ``fast_path.audit_file`` tails it).

    ``shards`` > 1 (the server's ``fast_path.shards``, the same number): the policy comes in
    that many parts, chosen per call by the claim (``dispatch_filter``); the client-header
    strip then runs first and jwt_authn sets the claim header. ``delta_xds`` (the default): Envoy
    asks for the policy over incremental ADS (``DELTA_GRPC``), whose TTL refresh carries no
    bodies; False: state of the world (``GRPC``), which re-sends every body each refresh.
    Raises ``ValueError`` if there is no such connection manager (or, sharded, no jwt_authn
    ahead of ext_authz)."""
    shard_names(shards)  # the bounds
    cfg = copy.deepcopy(bootstrap)
    node = cfg.setdefault("node", {"id": node_id, "cluster": node_id})
    # What this gateway was rendered for, sent with its ADS subscription: the server refuses
    # the policy to a gateway whose principal header is another claim than the one it matches.
    node.setdefault("metadata", {})[NODE_METADATA_KEY] = {"principal_claim": claim}
    audit_log = (audit_file_log(audit_file, str(node.get("id", node_id)), claim=claim) if audit_file is not None
           else audit_access_log(log_name=log_name, cluster=xds_cluster, flush_interval_s=audit_flush_interval_s,
                                 buffer_size_bytes=audit_buffer_bytes))
    wired = 0
    for listener in cfg.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                hcm = f.get("typed_config", {})
                filters = hcm.get("http_filters")
                if not filters or not any(h.get("name") == EXT_AUTHZ_FILTER for h in filters):
                    continue
                at = next(i for i, h in enumerate(filters) if h.get("name") == EXT_AUTHZ_FILTER)
                filters[at] = gated_ext_authz(filters[at])
                if shards == 1:
                    filters[at:at] = [strip_filter(), rbac_filter()]
                else:
                    jwt = next((i for i, h in enumerate(filters[:at]) if h.get("name") == JWT_FILTER), None)
                    if jwt is None:
                        raise ValueError("the sharded fast path needs the jwt_authn filter ahead of ext_authz")
                    claim_to_header(filters[jwt], claim)
                    filters[at:at] = [dispatch_filter(shards)]
                    filters[jwt:jwt] = [strip_filter()]  # before jwt_authn sets the claim header
                for log in hcm.get("access_log", []):
                    fields = log.get("typed_config", {}).get("log_format", {}).get("json_format")
                    if isinstance(fields, dict):
                        fields.update(ACCESS_LOG_FIELDS)
                hcm.setdefault("access_log", []).append(copy.deepcopy(audit_log))
                for vh in hcm.get("route_config", {}).get("virtual_hosts", []):
                    headers = fast_path_headers(claim=claim)
                    if shards > 1:  # jwt_authn already sets the principal header, to the same claim
                        headers = [h for h in headers if h["header"]["key"] != PRINCIPAL_HEADER]
                    vh.setdefault("request_headers_to_add", []).extend(headers)
                wired += 1
    if not wired:
        raise ValueError("no HTTP connection manager with the ext_authz filter to add the fast path to")
    cfg["dynamic_resources"] = {"ads_config": {
        "api_type": "DELTA_GRPC" if delta_xds else "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": xds_cluster}}],
        "set_node_on_first_message_only": True}}
    layers = cfg.setdefault("layered_runtime", {"layers": []})["layers"]
    layers.insert(0, {"name": "rpcauthz_fast_path", "static_layer": {
        "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
        "re2.max_program_size.warn_level": RE2_MAX_PROGRAM_SIZE}})
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m fastpath.envoy_config envoy/gateway.yaml``: its fast-path variant on stdout
    (how envoy/gateway-fast-path.yaml is made; a test keeps the two in step)."""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fastpath.envoy_config GATEWAY_YAML", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    sys.stdout.write(HEADER + yaml.safe_dump(with_fast_path(cfg), sort_keys=False, default_flow_style=False))
    return 0


HEADER = """\
# rpcauthz gateway WITH THE FAST PATH: envoy/gateway.yaml plus Envoy's RBAC filter over xDS.
# Generated: python -m fastpath.envoy_config envoy/gateway.yaml > envoy/gateway-fast-path.yaml
# (tests/test_envoy_configs.py checks it is current). Tune gateway.yaml, then regenerate;
# every TUNE: line of gateway.yaml applies here too (comments are in gateway.yaml).
#
# Request path:  client -> jwt_authn -> rpcauthz_strip_client_headers (drop client x-rpcauthz-*)
#   -> rpcauthz_fast_path (RBAC, a shadow matcher only, config from the ext_authz server over delta ADS;
#      ENGINEERS_/CONTRIBUTORS_WITHOUT_APPROVAL calls of eligible callers are "allowed")
#   -> ext_authz (in Envoy's composite filter: made only when the shadow result is not "allowed")
#   -> router
# Audit: the http_grpc access log "rpcauthz_fast_path" streams each fast-path allow to the
# ext_authz server (one decision audit event per call). TUNE: buffer_flush_interval /
# buffer_size_bytes: larger = cheaper per call, more entries lost if Envoy dies unflushed.
# The ext_authz server must run with fast_path.enabled: true. Without it (or when it is
# gone for fast_path.ttl_s) the RBAC filter has the empty policy: every call goes to ext_authz.
"""


if __name__ == "__main__":
    raise SystemExit(main())
