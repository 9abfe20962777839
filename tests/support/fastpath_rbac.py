"""A small evaluator of the RBAC subset ``fastpath.compile`` emits, for the pure tests:
what Envoy's shadow engine would answer for (principal, method, path).

The subset: ``shadow_matcher`` (xds.type.matcher.v3.Matcher) with matcher lists (single,
and, or predicates), exact and prefix match trees, ``on_no_match``, request-header inputs with exact string matches,
jwt_authn's dynamic-metadata input with the metadata input matcher (a string value: exact,
an or of exact ones, or RE2 ``safe_regex``), and RBAC ``Action`` s. Anything else fails the test (the compiler emitted
something this evaluator, and the reasoning behind it, does not cover). A principal that is
not a string (``int``, ``list``, ``None`` for a missing claim) never matches a string value.
"""
from __future__ import annotations

import re

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.matching.input_matchers.metadata.v3 import metadata_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, string_pb2, value_pb2
from xds.type.matcher.v3 import matcher_pb2

from fastpath.compile import JWT_SUB, IdentitySource

_HEX = re.compile(r"\\x\{([0-9a-f]+)\}")
Pred = matcher_pb2.Matcher.MatcherList.Predicate


def _python_regex(re2: str) -> re.Pattern[str]:
    return re.compile(_HEX.sub(lambda m: re.escape(chr(int(m.group(1), 16))), re2))


def _string(m: string_pb2.StringMatcher, value: object) -> bool:
    if not isinstance(value, str):
        return False
    kind = m.WhichOneof("match_pattern")
    if kind == "exact":
        return value == m.exact
    if kind == "safe_regex":
        return _python_regex(m.safe_regex.regex).fullmatch(value) is not None
    raise AssertionError(f"unexpected matcher {kind}")


class _Request:
    def __init__(self, headers: dict[str, str], metadata: dict[str, object]) -> None:
        self.headers, self.metadata = headers, metadata

    def input(self, config) -> object:  # type: ignore[no-untyped-def]
        if config.typed_config.Is(http_inputs_pb2.HttpRequestHeaderMatchInput.DESCRIPTOR):
            h = http_inputs_pb2.HttpRequestHeaderMatchInput()
            config.typed_config.Unpack(h)
            return self.headers.get(h.header_name)
        d = network_inputs_pb2.DynamicMetadataInput()
        assert config.typed_config.Unpack(d), config.typed_config.type_url
        value: object = self.metadata.get(d.filter)
        for seg in d.path:
            value = value.get(seg.key) if isinstance(value, dict) else None
        return value


def _predicate(p: Pred, req: _Request) -> bool:
    kind = p.WhichOneof("match_type")
    if kind == "and_matcher":
        return all(_predicate(q, req) for q in p.and_matcher.predicate)
    if kind == "or_matcher":
        return any(_predicate(q, req) for q in p.or_matcher.predicate)
    assert kind == "single_predicate", kind
    single = p.single_predicate
    value = req.input(single.input)
    if single.HasField("value_match"):
        assert single.value_match.WhichOneof("match_pattern") == "exact"
        return isinstance(value, str) and value == single.value_match.exact
    m = metadata_pb2.Metadata()
    assert single.custom_match.typed_config.Unpack(m), single.custom_match.typed_config.type_url
    assert not m.invert
    return _value(m.value, value)


def _value(m: value_pb2.ValueMatcher, value: object) -> bool:
    if m.HasField("or_match"):
        return any(_value(v, value) for v in m.or_match.value_matchers)
    assert m.HasField("string_match"), m
    return _string(m.string_match, value)


def _on_match(o: matcher_pb2.Matcher.OnMatch, req: _Request) -> str | None:
    if o.HasField("matcher"):
        return _matcher(o.matcher, req)
    action = rbac_pb2.Action()
    assert o.action.typed_config.Unpack(action), o.action.typed_config.type_url
    return action.name if action.action == rbac_pb2.RBAC.ALLOW else None


def _matcher(m: matcher_pb2.Matcher, req: _Request) -> str | None:
    if m.HasField("matcher_tree"):
        tree = m.matcher_tree
        value = req.input(tree.input)
        if tree.HasField("exact_match_map"):
            hit = tree.exact_match_map.map[value] if isinstance(value, str) and value in tree.exact_match_map.map else None
        else:
            assert tree.HasField("prefix_match_map")
            keys = [k for k in tree.prefix_match_map.map if isinstance(value, str) and value.startswith(k)]
            assert len(keys) <= 1, keys  # the compiler's prefixes ("/service/") never nest
            hit = tree.prefix_match_map.map[keys[0]] if keys else None
        if hit is not None:
            return _on_match(hit, req)
    else:
        for fm in m.matcher_list.matchers:
            if _predicate(fm.predicate, req):
                return _on_match(fm.on_match, req)
    return _on_match(m.on_no_match, req) if m.HasField("on_no_match") else None


def shadow_allows(rbac: http_rbac_pb2.RBAC, principal: object, path: str, method: str = "POST",
                  identity: IdentitySource = JWT_SUB) -> str | None:
    """The effective policy id (the matched action's name) when Envoy's shadow result would be
    "allowed", else None. ``principal``: the verified claim's JSON value (None: absent)."""
    assert not rbac.HasField("rules") and not rbac.HasField("matcher"), "the fast path must never enforce"
    if not rbac.HasField("shadow_matcher"):
        assert rbac.shadow_rules.action == rbac_pb2.RBAC.ALLOW and not rbac.shadow_rules.policies
        return None
    payload = {} if principal is None else {identity.claim: principal}
    req = _Request({":path": path, ":method": method}, {identity.namespace: {identity.payload_key: payload}})
    return _matcher(rbac.shadow_matcher, req)
