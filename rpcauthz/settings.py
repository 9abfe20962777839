"""One configuration model for every long-running component.

Each server (the ext_authz server, the approvals server, the credential broker) describes its
configuration as a pydantic model built from :class:`Section` (frozen, unknown keys refused)
and loads it with :func:`load`, which layers, lowest first:

1. the YAML file given with ``--config`` (optional for components whose keys all have defaults);
2. environment variables under the one prefix ``RPCAUTHZ_``, named by one rule:
   ``RPCAUTHZ_<SECTION>__<KEY>`` with ``__`` between levels, case-insensitive
   (``RPCAUTHZ_LISTEN__PORT=9001``, ``RPCAUTHZ_STORE_URL=postgresql://...``); the value is read
   as a YAML scalar or flow collection (``true``, ``5``, ``[a, b]``, ``{k: v}``). Variables
   that name no key of the component being loaded are other components' and are ignored;
3. command-line flags, passed as ``overrides`` with dotted keys (``{"listen.port": 9001}``).

A problem raises :class:`ConfigError`, whose message names each bad key, where its value came
from (the file and line, or the variable) and what is wrong with it.

This module is plumbing: it imports nothing else of ours.
"""
from __future__ import annotations

import ipaddress
import os
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

#: The one prefix of every configuration variable.
ENV_PREFIX = "RPCAUTHZ_"
#: Variables under the prefix that are not configuration (the test suite's own).
NOT_CONFIG = frozenset({"RPCAUTHZ_TEST_PG_DSN"})

M = TypeVar("M", bound=BaseModel)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable only from this machine;
    a name other than ``localhost`` is not (it may resolve to anything). For the servers'
    checks on where they listen and which URLs they trust."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """The configuration is unusable; the message names the offending key and its source."""


class Section(BaseModel):
    """Base of every configuration model and section: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def env_name(*keys: str) -> str:
    """The environment variable for a key path: ``env_name("listen", "port")`` is
    ``RPCAUTHZ_LISTEN__PORT``."""
    return ENV_PREFIX + "__".join(k.upper() for k in keys)


def load(model: type[M], path: str | os.PathLike[str] | None = None, *, component: str,
         env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> M:
    """Build ``model`` from the YAML file ``path``, then ``RPCAUTHZ_*`` variables in ``env``
    (``os.environ`` by default), then ``overrides`` (dotted keys, e.g. from CLI flags).

    ``component`` names the component in error messages ("ext_authz", "approvals", ...).
    """
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    file_label = ""
    if path is not None:
        p = pathlib.Path(path)
        file_label = str(p)
        data, lines = read_yaml(p)
    sources: dict[tuple[str, ...], str] = {}
    for name, value in (os.environ if env is None else env).items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_CONFIG:
            continue
        keys = tuple(k.lower() for k in name[len(ENV_PREFIX):].split("__"))
        if not known_key(model, keys):
            continue  # another component's variable: they share the prefix
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value
        _set(data, keys, parsed)
        sources[keys] = f"${name}"
    for dotted, value in (overrides or {}).items():
        keys = tuple(dotted.split("."))
        _set(data, keys, value)
        sources[keys] = "command line"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, component=component, sources=sources, lines=lines,
                                   file_label=file_label)) from None


def read_yaml(path: pathlib.Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The mapping in ``path`` and the line (1-based) of every key in it, by key path."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(node, (), lines)
    return loaded, lines


def _key_lines(node: yaml.Node | None, at: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*at, str(key.value))
            out[here] = key.start_mark.line + 1
            _key_lines(value, here, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            here = (*at, str(i))
            out[here] = item.start_mark.line + 1
            _key_lines(item, here, out)


def known_key(model: type[BaseModel], keys: tuple[str, ...]) -> bool:
    """Whether ``keys`` is a path of fields of ``model`` (through nested sections), or a
    path into a field that holds a mapping."""
    current: type[BaseModel] | None = model
    for k in keys:
        if current is None:
            return True  # inside a mapping-valued field: any key is the mapping's
        if k not in current.model_fields:
            return False
        current, is_mapping = _section_of(current.model_fields[k].annotation)
        if current is None and not is_mapping and k != keys[-1]:
            return False
    return True


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, if any; whether it holds a mapping)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    is_mapping = False
    for option in options:
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option, False
        origin = typing.get_origin(option) or option
        if isinstance(origin, type) and issubclass(origin, Mapping | dict):
            is_mapping = True
    return None, is_mapping


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    node[keys[-1]] = value


def describe(e: ValidationError, *, component: str,
             sources: Mapping[tuple[str, ...], str] | None = None,
             lines: Mapping[tuple[str, ...], int] | None = None, file_label: str = "") -> str:
    """One line per error: the key, where its value came from, what is wrong."""
    sources = sources or {}
    lines = lines or {}
    out = []
    for err in e.errors():
        loc = tuple(str(x) for x in err["loc"])
        key = ".".join(loc) or "(top level)"
        where = ""
        for n in range(len(loc), 0, -1):  # the key itself, else its nearest parent
            if loc[:n] in sources:
                where = f" (from {sources[loc[:n]]})"
                break
            if loc[:n] in lines:
                where = f" (at {file_label} line {lines[loc[:n]]})"
                break
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(f"{key}: {msg}{where}")
    return f"invalid {component} configuration: " + "; ".join(out)
