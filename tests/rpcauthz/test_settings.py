"""The one configuration base: file, then RPCAUTHZ_<SECTION>__<KEY> variables, then flags;
errors name the key and where its value came from."""
from __future__ import annotations

import pytest
from pydantic import Field

from rpcauthz.settings import ConfigError, Section, env_name, known_key, load


class Inner(Section):
    port: int = Field(1, ge=0)
    names: list[str] = Field(default_factory=list)


class Optional_(Section):
    key: str | None = None


class Model(Section):
    url: str
    inner: Inner = Inner()
    maybe: Optional_ | None = None
    table: dict[str, int] = Field(default_factory=dict)


def test_the_naming_rule():
    assert env_name("inner", "port") == "RPCAUTHZ_INNER__PORT"
    assert known_key(Model, ("inner", "port")) and known_key(Model, ("maybe", "key"))
    assert known_key(Model, ("table", "anything")) and not known_key(Model, ("inner", "nope"))
    assert not known_key(Model, ("url", "deeper"))


def test_file_then_variables_then_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("url: from-file\ninner: {port: 5, names: [a]}\n")
    env = {"RPCAUTHZ_INNER__PORT": "6", "rpcauthz_maybe__key": "k", "RPCAUTHZ_TABLE": "{x: 1}",
           "RPCAUTHZ_OTHER__THING": "another component's", "RPCAUTHZ_TEST_PG_DSN": "not config"}
    m = load(Model, p, component="test", env=env)
    assert (m.url, m.inner.port, m.inner.names, m.maybe.key, m.table) == ("from-file", 6, ["a"], "k", {"x": 1})
    m = load(Model, p, component="test", env=env, overrides={"inner.port": 7})
    assert m.inner.port == 7


@pytest.mark.parametrize("text, env, overrides, words", [
    ("url: x\ninner:\n  port: -1\n", {}, {}, "invalid test configuration: inner.port: Input should be "
                                             "greater than or equal to 0 (at {p} line 3)"),
    ("url: x\ninner:\n  names: [a, 5]\n", {}, {}, "inner.names.1: Input should be a valid string (at {p} line 3)"),
    ("url: x\nextra: 1\n", {}, {}, "extra: unknown key (at {p} line 2)"),
    ("inner: {}\n", {}, {}, "url: required key is missing"),
    ("url: x\n", {"RPCAUTHZ_INNER__PORT": "many"}, {}, "inner.port: Input should be a valid integer, "
                                                        "unable to parse string as an integer (from $RPCAUTHZ_INNER__PORT)"),
    ("url: x\n", {}, {"inner.port": -2}, "inner.port: Input should be greater than or equal to 0 (from command line)"),
])
def test_errors_name_key_and_source(tmp_path, text, env, overrides, words):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(Model, p, component="test", env=env, overrides=overrides)
    assert words.format(p=p) in str(e.value)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(Model, tmp_path / "missing.yaml", component="test", env={})
    (tmp_path / "bad.yaml").write_text("url: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load(Model, tmp_path / "bad.yaml", component="test", env={})
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load(Model, tmp_path / "list.yaml", component="test", env={})


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("10.0.0.5", False), ("db.internal", False), ("", False),
])
def test_is_loopback_names_only_this_machine(host, local):
    from rpcauthz.settings import is_loopback
    assert is_loopback(host) is local
