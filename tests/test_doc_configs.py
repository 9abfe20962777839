"""Every YAML example in README.md and docs/*.md is loaded against the schema it shows.

Each block starts with a comment naming what it configures: ``# rpcauthz: COMPONENT``
(extauthz, approvals, broker, reflection, envoy-catalog, oncall) or ``# kubeconfig`` (kubectl's
own format, checked for the ``mpa fetch`` command it runs). A block without a known mark fails,
so a new example cannot skip the check.
"""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            first = m.group(1).splitlines()[0] if m.group(1) else ""
            out.append((f"{doc.relative_to(ROOT)}:{line}", first, m.group(1)))
    return out


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    p = tmp_path / "example.yaml"
    p.write_text(text)
    return p


def load_extauthz(tmp_path, text):
    from extauthz.config import load_settings
    return load_settings(write(tmp_path, text), env={})


def load_approvals(tmp_path, text):
    from mpa.config import load_approvals_config
    return load_approvals_config(write(tmp_path, text), env={})


def load_broker(tmp_path, text):
    from enclave_bridge.broker.config import BrokerConfig
    (tmp_path / "issuer-jwks.json").write_text(json.dumps({"keys": [{"kty": "EC", "kid": "k"}]}))
    return BrokerConfig.from_file(write(tmp_path, text), env={})


def load_reflection(tmp_path, text):
    """A ``reflection:`` section: both servers that read reflection must accept it."""
    from extauthz.config import load_settings
    from mpa.config import load_approvals_config
    path = write(tmp_path, text)
    load_approvals_config(path, env={}, overrides={"store_url": "sqlite:///x.db", "issuer": "https://i",
                                                   "jwks_url": "https://i/jwks"})
    return load_settings(path, env={}, overrides={"store_url": "sqlite:///x.db"})


def load_envoy_catalog(tmp_path, text):
    from owners.envoy_render import parse_catalog
    return parse_catalog(text, "example.yaml")


def load_oncall(tmp_path, text):
    from policy.sync import oncall_grants
    return oncall_grants(write(tmp_path, text))


def load_kubeconfig(tmp_path, text):
    exec_ = yaml.safe_load(text)["users"][0]["user"]["exec"]
    assert exec_["command"] == "mpa" and exec_["args"][0] == "fetch"
    return exec_


LOADERS = {"# rpcauthz: extauthz": load_extauthz, "# rpcauthz: approvals": load_approvals,
           "# rpcauthz: broker": load_broker, "# rpcauthz: reflection": load_reflection,
           "# rpcauthz: envoy-catalog": load_envoy_catalog, "# rpcauthz: oncall": load_oncall,
           "# kubeconfig": load_kubeconfig}


def test_the_docs_have_examples_of_every_server():
    marks = {first for _, first, _ in blocks()}
    assert {"# rpcauthz: extauthz", "# rpcauthz: approvals", "# rpcauthz: broker"} <= marks


@pytest.mark.parametrize("where, first, text", blocks(), ids=[b[0] for b in blocks()])
def test_yaml_example_loads_against_its_schema(tmp_path, where, first, text):
    loader = next((f for mark, f in LOADERS.items() if first.startswith(mark)), None)
    assert loader is not None, f"{where}: start the block with one of {sorted(LOADERS)}"
    assert loader(tmp_path, text) is not None


@pytest.mark.parametrize("mark, model", [
    ("# rpcauthz: extauthz", "extauthz.config:Settings"),
    ("# rpcauthz: approvals", "mpa.config:ApprovalsConfig"),
    ("# rpcauthz: broker", "enclave_bridge.broker.config:BrokerFile"),
])
def test_every_top_level_key_is_documented(mark, model):
    """The docs' examples of a server together show each of its top-level keys."""
    import importlib
    module, _, name = model.partition(":")
    fields = set(getattr(importlib.import_module(module), name).model_fields)
    shown: set[str] = set()
    for _, first, text in blocks():
        if first.startswith(mark):
            shown |= set(yaml.safe_load(text))
    assert sorted(fields - shown) == []
