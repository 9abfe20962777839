"""A small Envoy fed over ADS by a test's own xDS server: the given HTTP filters, a direct
response, a dry-run service's route (``/dry.v1.S/``, the fast-path filter off there, as
``mpactl envoy render`` makes it) and a JSON file access log of the fast path's fields."""
from __future__ import annotations

import pathlib
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from devstack.processes import free_port
from fastpath.compile import RESOURCE_NAME
from fastpath.envoy_config import ACCESS_LOG_FIELDS, RE2_MAX_PROGRAM_SIZE
from fastpath.xds import FastPathXds


async def serve_ads(xds: FastPathXds, port: int | None = None) -> tuple[grpc.aio.Server, int]:
    """``xds`` served (started) on 127.0.0.1:``port``, a free port if None; (server, port)."""
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    port = port if port is not None else free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def xds_envoy_config(xds_port: int, log: pathlib.Path, http_filters: list[dict[str, Any]], *,
                     node: str = "test-gw", api_type: str = "GRPC",
                     log_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The bootstrap: ``http_filters`` then the router, ADS (``api_type``) from 127.0.0.1:``xds_port``,
    the access log (``ACCESS_LOG_FIELDS`` plus ``log_fields``) to ``log``."""
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "dynamic_resources": {"ads_config": {"api_type": api_type, "transport_api_version": "V3",
                                             "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "layered_runtime": {"layers": [{"name": "re2", "static_layer": {
            "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE}}]},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                                        "port_value": free_port()}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "t",
                                   "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                       "path": str(log), "log_format": {"json_format": {
                                           **ACCESS_LOG_FIELDS, **(log_fields or {})}}}}],
                                   "http_filters": [*http_filters, ROUTER],
                                   "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
                                       {"match": {"prefix": "/dry.v1.S/"}, "direct_response": {"status": 200},
                                        "typed_per_filter_config": {RESOURCE_NAME: {
                                            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                            "disabled": True}}},
                                       {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}}}]}]}],
            "clusters": [{"name": "xds", "type": "STATIC", "connect_timeout": "0.25s",
                          "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                              "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                              "explicit_http_config": {"http2_protocol_options": {}}}},
                          "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                              "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}}]},
    }
