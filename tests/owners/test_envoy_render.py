"""``mpactl envoy render / validate / dry-run``: catalog checks and the real envoy validator."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from owners.envoy_render import (
    EXT_AUTHZ_HEALTH_CHECK,
    EXT_AUTHZ_OUTLIER_DETECTION,
    EXT_AUTHZ_RETRY_POLICY,
    CatalogError,
    parse_catalog,
    render,
)
from tests.support.owners_support import run_mpactl

CATALOG = """\
gateway:
  listen: 127.0.0.1:10000
  admin: 127.0.0.1:9901
  ext_authz:
    address: 127.0.0.1:9001
    timeout: 1200ms
  jwt:
    issuer: https://issuer.dev.local
    audiences: [rpcauthz]
    jwks_uri: http://127.0.0.1:8081/.well-known/jwks.json
services:
  - name: rpcauthz.demo.v1.Accounts
    upstream: 127.0.0.1:50051
    timeout: 5s
    routes:
      - method: Ping
        ext_authz: false
        jwt: false
      - method: CloseAccount
        buffer_body: 65536
  - prefix: rpcauthz.demo.
    upstream: ledger.internal:50052
    dry_run: true
  - name: grpc.health.v1.Health
    upstream: 127.0.0.1:50051
    ext_authz: false
    jwt: false
"""


@pytest.mark.envoy
def test_rendered_config_passes_envoy_validate(tmp_path: Path):
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG)
    out = tmp_path / "gateway.yaml"
    res = run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out), "--validate")
    assert res.returncode == 0, res.stderr
    assert "DRY RUN" in res.stderr and "rpcauthz.demo." in res.stderr
    assert "no ext_authz on: /grpc.health.v1.Health/, /rpcauthz.demo.v1.Accounts/Ping" in res.stderr
    res = run_mpactl("envoy", "validate", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout


@pytest.mark.envoy
def test_validate_rejects_a_broken_config(tmp_path: Path):
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG)
    text = run_mpactl("envoy", "render", "--catalog", str(cat)).stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("cluster: svc_rpcauthz_demo_v1_Accounts", "cluster: no_such_cluster", 1))
    res = run_mpactl("envoy", "validate", str(broken))
    assert res.returncode == 1
    assert "no_such_cluster" in res.stderr


def test_rendered_shape_fails_closed_and_routes_most_specific_first():
    cfg = render(parse_catalog(CATALOG, "services.yaml"))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.ext_authz",
                     "envoy.filters.http.router"]
    ext = hcm["http_filters"][1]["typed_config"]
    assert ext["failure_mode_allow"] is False
    assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
    assert ext["grpc_service"]["timeout"] == "1.200s"
    assert ext["metadata_context_namespaces"] == ["envoy.filters.http.jwt_authn"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    order = [r["match"].get("path") or r["match"]["prefix"] for r in routes]
    assert order == ["/rpcauthz.demo.v1.Accounts/Ping", "/rpcauthz.demo.v1.Accounts/CloseAccount",
                     "/rpcauthz.demo.v1.Accounts/", "/grpc.health.v1.Health/", "/rpcauthz.demo.", "/"]
    ping, close, accounts, health, demo, rest = routes
    assert rest["route"]["cluster"] == "unrouted" and "typed_per_filter_config" not in rest
    assert ping["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    assert ping["typed_per_filter_config"]["envoy.filters.http.jwt_authn"]["disabled"] is True
    body = close["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]["with_request_body"]
    assert body["max_request_bytes"] == 65536 and body["allow_partial_message"] is False
    assert accounts["route"]["timeout"] == "5.000s"
    ctx = demo["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
    assert ctx == {"service": "rpcauthz.demo.", "dry_run": "true"}
    assert "dry_run" not in accounts["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters["svc_rpcauthz_demo"]["type"] == "STRICT_DNS"
    # Retries only to fail over (bounded); see test_failover_settings_match_gateway_yaml.
    assert 0 < clusters["ext_authz"]["circuit_breakers"]["thresholds"][0]["max_retries"] < 1024


def _bad(tmp_path: Path, text: str) -> tuple[Path, Path]:
    cat = tmp_path / "services.yaml"
    cat.write_text(textwrap.dedent(text))
    return cat, tmp_path / "out.yaml"


HEAD = """\
gateway:
  listen: 127.0.0.1:10000
  ext_authz: {address: 127.0.0.1:9001}
  jwt: {issuer: https://i, jwks_file: /tmp/jwks.json}
services:
"""


@pytest.mark.parametrize("services, line, message", [
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n  - name: a.v1.A\n    upstream: 127.0.0.1:2\n",
     8, "duplicate service 'a.v1.A' (first on line 6)"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    timeuot: 5s\n", 8, "unknown key 'timeuot'"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:99999\n", 7, "is not a HOST:PORT address"),
    ("  - name: a.v1.A\n    upstream: not_a host:80\n", 7, "is not a HOST:PORT address"),
    ("  - name: a.v1.A\n", 6, "missing required key 'upstream'"),
    ("  - just-a-string\n", 6, "must be a mapping"),
    ("  - name: Accounts\n    upstream: 127.0.0.1:1\n", 6, "a full service name"),
    ("  - prefix: acme\n    upstream: 127.0.0.1:1\n", 6, "a package prefix ends with a dot"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    timeout: soon\n", 8, "must be a duration"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    dry_run: maybe\n", 8, "must be true or false"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    upstream: 127.0.0.1:2\n", 8, "duplicate key 'upstream'"),
    ("  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    routes:\n      - method: X\n      - method: X\n",
     10, "duplicate route for method 'X'"),
    ("  - name: a.v1.A\n    upstream: [127.0.0.1:1\n", 8, "not valid YAML"),
    # A trailing newline ("...$" lets one in with match) is no part of a name or a host.
    ('  - name: "a.v1.A\\n"\n    upstream: 127.0.0.1:1\n', 6, "'a.v1.A\\n' is malformed"),
    ('  - prefix: "acme.\\n"\n    upstream: 127.0.0.1:1\n', 6, "a package prefix ends with a dot"),
    ('  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    routes:\n      - method: "Get\\n"\n', 9,
     "a bare method name like Check"),
    ('  - name: a.v1.A\n    upstream: "db.internal\\n:80"\n', 7, "is not a HOST:PORT address"),
])
def test_catalog_errors_name_file_and_line_and_write_nothing(tmp_path: Path, services, line, message):
    cat, out = _bad(tmp_path, HEAD + services)
    res = run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out))
    assert res.returncode == 2
    assert f"{cat}:{line}: " in res.stderr, res.stderr
    assert message in res.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["services.yaml"]


def test_failed_render_leaves_previous_output_alone(tmp_path: Path):
    cat, out = _bad(tmp_path, HEAD + "  - name: a.v1.A\n    upstream: 127.0.0.1:1\n")
    assert run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out)).returncode == 0
    good = out.read_bytes()
    cat.write_text(HEAD + "  - name: a.v1.A\n    upstream: 127.0.0.1:1\n    routes: nope\n")
    res = run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out))
    assert res.returncode == 2 and f"{cat}:8:" in res.stderr
    assert out.read_bytes() == good


def test_gateway_errors():
    with pytest.raises(CatalogError, match=r"^c.yaml:1: catalog: missing required key 'services'"):
        parse_catalog("gateway: {}\n", "c.yaml")
    with pytest.raises(CatalogError, match=r"^c.yaml:4: gateway.jwt: give exactly one of jwks_uri or jwks_file"):
        parse_catalog("gateway:\n  listen: 127.0.0.1:1\n  ext_authz: {address: 127.0.0.1:2}\n  jwt: {issuer: x}\nservices: []\n", "c.yaml")
    with pytest.raises(CatalogError, match=r"^c.yaml:1: the catalog is empty"):
        parse_catalog("", "c.yaml")


def test_dry_run_report(tmp_path: Path):
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG)
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat))
    assert res.returncode == 5  # ExitCode.DRY_RUN
    assert "DRY RUN (not enforced) for 1 service(s):" in res.stdout and "rpcauthz.demo." in res.stdout
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--json")
    assert res.returncode == 5, res.stderr
    data = json.loads(res.stdout)
    assert data["source"] == str(cat) and len(data["dry_run_services"]) == 1
    assert data["dry_run_services"] == [{"name": "rpcauthz.demo.", "since": None, "days": None, "overdue": True}]
    cat.write_text(CATALOG.replace("dry_run: true", "dry_run: false"))
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat))
    assert res.returncode == 0 and "no service in dry-run" in res.stdout
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == {"source": str(cat), "dry_run_services": []}
    rendered = yaml.safe_load(run_mpactl("envoy", "render", "--catalog", str(cat)).stdout)
    assert rendered["static_resources"]["listeners"][0]["name"] == "gateway"


def test_dry_run_max_days_flags_only_the_forgotten(tmp_path: Path):
    """``--max-days N``: exit 5 only for a service in dry-run more than N days, or for an
    unknown time; the day is the catalog's ``dry_run_since``, carried in the rendered routes."""
    import datetime

    today = datetime.datetime.now(datetime.UTC).date()
    long_ago, recent = today - datetime.timedelta(days=30), today - datetime.timedelta(days=2)
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG.replace("dry_run: true", f"dry_run: true\n    dry_run_since: {recent}"))
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--max-days", "7")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"since {recent} (2 days)" in res.stdout and "OVERDUE" not in res.stdout
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--max-days", "1", "--json")
    assert res.returncode == 5
    assert json.loads(res.stdout)["dry_run_services"] == [
        {"name": "rpcauthz.demo.", "since": recent.isoformat(), "days": 2, "overdue": True}]

    cat.write_text(CATALOG.replace("dry_run: true", f"dry_run: true\n    dry_run_since: {long_ago}"))
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--max-days", "7")
    assert res.returncode == 5 and "(30 days)  OVERDUE" in res.stdout, res.stdout
    # The running gateway's routes carry the day (what --admin reads).
    rendered = render(parse_catalog(cat.read_text(), "services.yaml"))
    from owners.envoy_render import dry_run_from_config_dump
    assert [(d.name, d.since) for d in dry_run_from_config_dump(rendered)] == [("rpcauthz.demo.", long_ago)]

    # No dry_run_since: an unknown time counts as too long.
    cat.write_text(CATALOG)
    res = run_mpactl("envoy", "dry-run", "--catalog", str(cat), "--max-days", "365")
    assert res.returncode == 5 and "unknown day" in res.stdout


def test_dry_run_since_errors():
    with pytest.raises(CatalogError, match=r"dry_run_since needs dry_run: true"):
        parse_catalog(CATALOG.replace("dry_run: true", "dry_run_since: 2026-11-20"), "c.yaml")
    with pytest.raises(CatalogError, match=r"dry_run_since must be a day like 2026-11-20, not 'last week'"):
        parse_catalog(CATALOG.replace("dry_run: true", "dry_run: true\n    dry_run_since: last week"), "c.yaml")


def test_rendered_config_keeps_the_invariants_of_envoy_gateway_yaml():
    """The same fail-closed invariants tests/extauthz checks on the hand-written gateway.yaml,
    and agreement with the ext_authz server's defaults (payload key, deadlines)."""
    from extauthz.config import Settings

    defaults = Settings(store_url="sqlite:///x.db")
    cfg = render(parse_catalog(CATALOG, "services.yaml"))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    ext = filters["envoy.filters.http.ext_authz"]
    assert ext["transport_api_version"] == "V3"
    timeout = float(ext["grpc_service"]["timeout"].rstrip("s"))
    assert timeout * 1000 > defaults.decision_deadline_ms > defaults.reflection.cache.deadline * 1000
    providers = filters["envoy.filters.http.jwt_authn"]["providers"]
    assert {p["payload_in_metadata"] for p in providers.values()} == {defaults.identity.payload_key}
    assert all(p["forward"] is False for p in providers.values())
    rules = filters["envoy.filters.http.jwt_authn"]["rules"]
    assert rules[0]["match"] == {"prefix": "/"} and "provider_name" in rules[0]["requires"]
    assert hcm["normalize_path"] is False and hcm["merge_slashes"] is False
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    for key in ("decision_id", "outcome", "mode", "rule", "principal"):
        assert fmt[key] == f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{key})%"
    ext_cluster = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_authz")
    assert ext_cluster["health_checks"][0]["grpc_health_check"]["service_name"] == \
        "envoy.service.auth.v3.Authorization"


def test_short_ext_authz_timeout_is_warned_about(tmp_path: Path):
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG.replace("timeout: 1200ms", "timeout: 500ms"))
    res = run_mpactl("envoy", "render", "--catalog", str(cat))
    assert res.returncode == 0
    assert "ext_authz.timeout 0.5s is not above the server's decision deadline" in res.stderr


# --- the mTLS link to ext_authz -----------------------------------------------------------------

def _ext_cluster(catalog_text: str) -> dict:
    rendered = render(parse_catalog(catalog_text, "c.yaml"))
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == "ext_authz"]
    return cluster


def _catalog(ext_authz: str) -> str:
    return ("gateway:\n  listen: 127.0.0.1:1\n" + ext_authz +
            "  jwt: {issuer: x, jwks_file: /tmp/j.json}\nservices:\n  - name: a.v1.A\n    upstream: 127.0.0.1:2\n")


def test_ext_authz_tls_is_on_for_a_remote_server_and_files_are_configurable():
    tls = _ext_cluster(_catalog("  ext_authz: {address: extauthz.internal:9001}\n"))["transport_socket"]["typed_config"]
    ctx = tls["common_tls_context"]
    assert ctx["tls_certificates"][0]["certificate_chain"]["filename"] == "/etc/rpcauthz/tls/envoy.crt"
    assert ctx["validation_context"]["trusted_ca"]["filename"] == "/etc/rpcauthz/tls/ca.crt"
    assert ctx["alpn_protocols"] == ["h2"] and tls["sni"] == "ext-authz.rpcauthz.internal"
    custom = _ext_cluster(_catalog(
        "  ext_authz:\n    address: 10.0.0.5:9001\n"
        "    tls: {ca: /pki/ca.pem, cert: /pki/e.pem, key: /pki/e.key, server_name: authz.corp}\n"))
    ctx = custom["transport_socket"]["typed_config"]["common_tls_context"]
    assert ctx["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "authz.corp"}
    assert ctx["tls_certificates"][0]["private_key"]["filename"] == "/pki/e.key"
    # Loopback: plaintext unless asked; `tls: true` turns the default files on.
    assert "transport_socket" not in _ext_cluster(_catalog("  ext_authz: {address: 127.0.0.1:9001}\n"))
    assert "transport_socket" in _ext_cluster(_catalog("  ext_authz: {address: 127.0.0.1:9001, tls: true}\n"))


def test_plaintext_to_a_remote_ext_authz_is_refused():
    with pytest.raises(CatalogError, match=r"^c.yaml:3: gateway.ext_authz.tls: false is allowed only for a loopback"):
        parse_catalog(_catalog("  ext_authz: {address: 10.0.0.5:9001, tls: false}\n"), "c.yaml")
    with pytest.raises(CatalogError, match=r"gateway.ext_authz.tls: unknown key 'cafile'"):
        parse_catalog(_catalog("  ext_authz: {address: 10.0.0.5:9001, tls: {cafile: x}}\n"), "c.yaml")


def test_ext_authz_on_a_unix_socket_renders_a_pipe_endpoint_without_tls():
    cluster = _ext_cluster(_catalog("  ext_authz: {unix_socket: /run/rpcauthz/extauthz.sock}\n"))
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": "/run/rpcauthz/extauthz.sock"}}
    assert cluster["type"] == "STATIC" and "transport_socket" not in cluster
    assert cluster["health_checks"] == [EXT_AUTHZ_HEALTH_CHECK]  # failover settings unchanged
    assert "transport_socket" not in _ext_cluster(_catalog(
        "  ext_authz: {unix_socket: /run/x.sock, tls: false}\n"))


@pytest.mark.parametrize("ext_authz, message", [
    ("{unix_socket: /run/x.sock, address: 127.0.0.1:9001}",
     "gateway.ext_authz: give exactly one of 'address' (HOST:PORT) and 'unix_socket' (a path), not both"),
    ("{timeout: 1s}", "give exactly one of 'address' (HOST:PORT) and 'unix_socket' (a path), not neither"),
    ("{unix_socket: run/x.sock}", "gateway.ext_authz.unix_socket: 'run/x.sock' is not an absolute path"),
    ("{unix_socket: /" + "d" * 120 + "}", "longer than the 107 bytes a unix socket path may have"),
    ("{unix_socket: /run/x.sock, tls: true}", "gateway.ext_authz.tls: not used with unix_socket"),
])
def test_bad_unix_socket_settings_are_refused_with_the_reason(ext_authz, message):
    with pytest.raises(CatalogError, match=re.escape(message)):
        parse_catalog(_catalog(f"  ext_authz: {ext_authz}\n"), "c.yaml")


def test_failover_settings_match_gateway_yaml():
    """The renderer and the hand-written envoy/gateway.yaml fail over the same way."""
    gw = yaml.safe_load((Path(__file__).resolve().parents[2] / "envoy" / "gateway.yaml").read_text())
    (cluster,) = [c for c in gw["static_resources"]["clusters"] if c["name"] == "ext_authz"]
    hcm = gw["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ext,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    rendered = _ext_cluster(_catalog("  ext_authz: {address: 127.0.0.1:9001}\n"))
    assert cluster["health_checks"] == rendered["health_checks"] == [EXT_AUTHZ_HEALTH_CHECK]
    assert cluster["outlier_detection"] == rendered["outlier_detection"] == EXT_AUTHZ_OUTLIER_DETECTION
    assert ext["typed_config"]["grpc_service"]["envoy_grpc"]["retry_policy"] == EXT_AUTHZ_RETRY_POLICY
    hc = EXT_AUTHZ_HEALTH_CHECK
    assert hc["no_traffic_interval"] == hc["interval"] == "1s", "a dead replica must leave within seconds"
    assert "reset" not in EXT_AUTHZ_RETRY_POLICY["retry_on"], "a reset Check may have spent an approval use"


@pytest.mark.envoy
def test_rendered_fast_path_config_passes_envoy_validate(tmp_path: Path):
    """``gateway.fast_path: true``: jwt_authn -> strip -> RBAC (ECDS over ADS) -> ext_authz ->
    router, validated by the real Envoy; the dry-run service's routes turn the RBAC filter off."""
    cat = tmp_path / "services.yaml"
    cat.write_text(CATALOG.replace("  jwt:\n", "  fast_path: true\n  jwt:\n", 1))
    out = tmp_path / "gateway.yaml"
    res = run_mpactl("envoy", "render", "--catalog", str(cat), "-o", str(out), "--validate")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(out.read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.jwt_authn", "rpcauthz_strip_client_headers", "rpcauthz_fast_path",
        "envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    assert cfg["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "ext_authz"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    dry = [r for r in routes if r.get("metadata", {}).get("filter_metadata", {}).get("rpcauthz", {}).get("dry_run")]
    assert dry and all(r["typed_per_filter_config"]["rpcauthz_fast_path"]["disabled"] for r in dry)
    # Without the switch: no trace of it.
    plain = yaml.safe_load(run_mpactl("envoy", "render", "--catalog", str(tmp_path / "plain.yaml")).stdout
                           if (tmp_path / "plain.yaml").write_text(CATALOG) else "")
    assert "rpcauthz_fast_path" not in json.dumps(plain) and "dynamic_resources" not in plain


def test_fast_path_takes_the_servers_principal_claim_and_refuses_a_bad_one(tmp_path: Path):
    from owners.envoy_render import CatalogError, parse_catalog, render

    cat = parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {principal_claim: email}\n  jwt:\n", 1))
    assert cat.gateway.fast_path and cat.gateway.fast_path_claim == "email"
    text = json.dumps(render(cat))
    assert ('"key": "x-rpcauthz-principal", "value": '
            '"%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload:email)%"') in text  # upstream header
    with pytest.raises(CatalogError, match="principal_claim.*malformed"):
        parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {principal_claim: 'a b'}\n  jwt:\n", 1))
    with pytest.raises(CatalogError, match="unknown key 'claim'"):
        parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {claim: email}\n  jwt:\n", 1))


def test_fast_path_audit_buffer_is_tunable_and_checked():
    """The access log of fast-path allows: 1 s / 1 MiB unless the catalog says otherwise."""
    from owners.envoy_render import CatalogError, parse_catalog, render

    def als(cfg):
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        [log] = [a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]
        return log["typed_config"]["common_config"]

    c = als(render(parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: true\n  jwt:\n", 1))))
    assert (c["log_name"], c["buffer_flush_interval"], c["buffer_size_bytes"]) == ("rpcauthz_fast_path", "1s", 1 << 20)
    assert c["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_authz"
    tuned = CATALOG.replace("  jwt:\n", "  fast_path: {audit_flush: 250ms, audit_buffer_bytes: 65536}\n  jwt:\n", 1)
    c = als(render(parse_catalog(tuned)))
    assert (c["buffer_flush_interval"], c["buffer_size_bytes"]) == ("0.25s", 65536)
    with pytest.raises(CatalogError, match="gateway.fast_path.audit_buffer_bytes must be a whole number"):
        parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {audit_buffer_bytes: 10}\n  jwt:\n", 1))
    with pytest.raises(CatalogError, match="gateway.fast_path.audit_flush must be a duration"):
        parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {audit_flush: soon}\n  jwt:\n", 1))


def test_fast_path_audit_can_go_to_a_file():
    """``gateway.fast_path.audit_file``: Envoy's file access log of fast-path allows (same
    filter, the node id written in) instead of the gRPC one; an absolute path only."""
    from fastpath.envoy_config import audit_access_log
    from owners.envoy_render import CatalogError, parse_catalog, render

    cfg = render(parse_catalog(CATALOG.replace(
        "  jwt:\n", "  fast_path: {audit_file: /var/log/envoy/fast-path-audit.log}\n  jwt:\n", 1)))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert not [a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]
    [log] = [a for a in hcm["access_log"] if a["typed_config"].get("path") == "/var/log/envoy/fast-path-audit.log"]
    assert log["filter"] == audit_access_log()["filter"]
    assert log["typed_config"]["log_format"]["json_format"]["node"] == cfg["node"]["id"]
    with pytest.raises(CatalogError, match="gateway.fast_path.audit_file.*absolute path"):
        parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {audit_file: audit.log}\n  jwt:\n", 1))


def test_fast_path_shards_render_the_dispatch_and_are_checked():
    """``gateway.fast_path.shards``: the policy in N parts (the server's fast_path.shards);
    dry-run routes still turn the fast path off by the filter's name."""
    from fastpath.compile import shard_names
    from owners.envoy_render import CatalogError, parse_catalog, render

    cfg = render(parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {shards: 16}\n  jwt:\n", 1)))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (dispatch,) = [f for f in hcm["http_filters"] if f["name"] == "rpcauthz_fast_path"]
    rules = dispatch["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    assert sorted(r["on_match"]["action"]["typed_config"]["dynamic_config"]["name"] for r in rules) == \
        sorted(shard_names(16))
    assert [f["name"] for f in hcm["http_filters"]][:2] == ["rpcauthz_strip_client_headers",
                                                           "envoy.filters.http.jwt_authn"]
    for bad in ("0", "65", "two"):
        with pytest.raises(CatalogError, match="gateway.fast_path.shards must be a whole number from 1 to 64"):
            parse_catalog(CATALOG.replace("  jwt:\n", f"  fast_path: {{shards: {bad}}}\n  jwt:\n", 1))
    assert cfg["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"  # the default
    sotw = render(parse_catalog(CATALOG.replace("  jwt:\n", "  fast_path: {delta_xds: false}\n  jwt:\n", 1)))
    assert sotw["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
