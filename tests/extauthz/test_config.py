"""Config file + environment overrides, and errors that name the bad key."""
from __future__ import annotations

import pytest

from extauthz.config import ConfigError, load_settings
from policy import Mode


def write(tmp_path, text: str):
    p = tmp_path / "extauthz.yaml"
    p.write_text(text)
    return p


def test_file_then_env_overrides(tmp_path):
    p = write(tmp_path, "store_url: sqlite:///a.db\nlisten: {port: 7000}\ndefault_mode: engineers_with_approval\n")
    s = load_settings(p, env={"RPCAUTHZ_LISTEN__PORT": "7001", "RPCAUTHZ_IDENTITY__DEV_MODE": "true",
                              "RPCAUTHZ_SOMETHING_ELSE": "ignored"})
    assert s.listen.port == 7001 and s.identity.dev_mode is True
    assert s.default_mode is Mode.ENGINEERS_WITH_APPROVAL
    assert s.store_url == "sqlite:///a.db"


@pytest.mark.parametrize("text,env,needle", [
    ("store_url: x\nlisten: {prot: 1}\n", {}, "listen.prot: unknown key"),
    ("listen: {port: 1}\n", {}, "store_url: required key is missing"),
    ("store_url: x\ndefault_mode: SOMETIMES\n", {}, "default_mode"),
    ("store_url: x\ndefault_mode: HUMANS_WHO_CAN_RPC_UNSPECIFIED\n", {}, "cannot be UNSPECIFIED"),
    ("store_url: x\n", {"RPCAUTHZ_LISTEN__PORT": "seventy"}, "(from $RPCAUTHZ_LISTEN__PORT)"),
    ("store_url: x\nworkers: 4\nlisten: {port: 0}\n", {}, "SO_REUSEPORT"),
    ("store_url: x\napprovals: {base_url: ftp://x}\n", {}, "approvals.base_url"),
    ("store_url: x\nreflection: {ttl: 5}\n", {}, "reflection.ttl is now reflection.cache.ttl"),
    ("store_url: x\nreflection: {endpoints: {default: 'orders.internal:50051'}}\n", {},
     "orders.internal:50051 is not on this machine: configure reflection.tls"),
    ("store_url: x\nreflection: {tls: {plaintext: true, ca_file: /ca.pem}}\n", {}, "plaintext: true cannot go with"),
    ("- a list\n", {}, "mapping"),
    ("store_url: [unclosed\n", {}, "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, env, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text), env=env)
    assert needle in str(e.value)


def test_errors_name_the_file_line_and_the_flag(tmp_path):
    p = write(tmp_path, "store_url: x\n\nlisten:\n  host: 0.0.0.0\n  prot: 1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p, env={})
    assert f"listen.prot: unknown key (at {p} line 5)" in str(e.value)
    with pytest.raises(ConfigError, match=r"workers: .* \(from command line\)"):
        load_settings(write(tmp_path, "store_url: x\n"), env={}, overrides={"workers": 0})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_the_documented_example_config_loads(tmp_path):
    """docs/extauthz.md's full example is a valid config (so the reference cannot rot)."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "extauthz.md").read_text()
    section = doc.split("## Server configuration", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    s = load_settings(write(tmp_path, example), env={})
    assert s.reflection.endpoints.template == "{name_lower}.svc.internal:50051"
    assert s.approvals.base_url == "https://mpa.example.com"
    assert s.default_mode is Mode.BREAK_GLASS_ONLY


def test_fast_path_is_off_by_default_and_its_bad_settings_are_named(tmp_path):
    s = load_settings(write(tmp_path, "store_url: x\n"), env={})
    assert s.fast_path.enabled is False
    on = load_settings(write(tmp_path, "store_url: x\nfast_path: {enabled: true, ttl_s: 12}\n"), env={})
    assert on.fast_path.enabled and on.fast_path.ttl_s == 12
    with pytest.raises(ConfigError, match="refresh_s"):
        load_settings(write(tmp_path, "store_url: x\nfast_path: {ttl_s: 5, refresh_s: 5}\n"), env={})
    with pytest.raises(ConfigError, match="dev_mode"):
        load_settings(write(tmp_path, "store_url: x\nfast_path: {enabled: true}\n"),
                      env={"RPCAUTHZ_IDENTITY__DEV_MODE": "true"})
    with pytest.raises(ConfigError, match="ttl_s"):
        load_settings(write(tmp_path, "store_url: x\nfast_path: {ttl_s: 0}\n"), env={})


@pytest.mark.parametrize("configured, session", [(None, "5s"), (0, "0"), (0.25, "250ms")],
                         ids=["default", "off", "set"])
async def test_the_gateways_store_statements_are_bounded_as_configured(tmp_path, pg_dsn, configured, session):
    """``store_statement_timeout_s`` reaches the PostgreSQL sessions the server decides on
    (docs/store.md: a lock held elsewhere then fails a call closed instead of holding it)."""
    from extauthz.server import open_components
    from tests.support.pg_session import statement_timeout_of

    config = tmp_path / "extauthz.yaml"
    config.write_text(f"store_url: '{pg_dsn}'\n"
                      + (f"store_statement_timeout_s: {configured}\n" if configured is not None else ""))
    components = await open_components(load_settings(config, env={}))
    try:
        assert statement_timeout_of(components.store) == session
    finally:
        await components.close()
