"""A small evaluator of the RBAC subset ``fastpath.compile`` emits, for the pure tests:
what Envoy's shadow engine would answer for (principal, method, path)."""
from __future__ import annotations

import re

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.type.matcher.v3 import string_pb2

from fastpath.compile import KEY_HEADER, key_value

_HEX = re.compile(r"\\x\{([0-9a-f]+)\}")


def _python_regex(re2: str) -> re.Pattern[str]:
    return re.compile(_HEX.sub(lambda m: re.escape(chr(int(m.group(1), 16))), re2))


def _string(m: string_pb2.StringMatcher, value: str | None) -> bool:
    if value is None:
        return False
    kind = m.WhichOneof("match_pattern")
    if kind == "exact":
        return value == m.exact
    if kind == "prefix":
        return value.startswith(m.prefix)
    if kind == "safe_regex":
        return _python_regex(m.safe_regex.regex).fullmatch(value) is not None
    raise AssertionError(f"unexpected matcher {kind}")


def _permission(p: rbac_pb2.Permission, headers: dict[str, str]) -> bool:
    kind = p.WhichOneof("rule")
    if kind == "and_rules":
        return all(_permission(r, headers) for r in p.and_rules.rules)
    if kind == "or_rules":
        return any(_permission(r, headers) for r in p.or_rules.rules)
    if kind == "header":
        return _string(p.header.string_match, headers.get(p.header.name))
    raise AssertionError(f"unexpected permission {kind}")


def _principal(p: rbac_pb2.Principal, principal: str | None) -> bool:
    kind = p.WhichOneof("identifier")
    assert kind == "sourced_metadata", kind
    assert p.sourced_metadata.metadata_source == rbac_pb2.DYNAMIC
    m = p.sourced_metadata.metadata_matcher
    return _string(m.value.string_match, principal)


def shadow_allows(rbac: http_rbac_pb2.RBAC, principal: str | None, path: str,
                  method: str = "POST", claim: str = "sub") -> str | None:
    """The name of the first shadow policy (Envoy's order: sorted names) that allows, else None."""
    assert not rbac.HasField("rules"), "the fast path must never enforce"
    assert rbac.shadow_rules.action == rbac_pb2.RBAC.ALLOW
    headers = {":path": path, ":method": method}
    if principal is not None:  # what Envoy's header_mutation sets (fastpath/envoy_config.py)
        headers[KEY_HEADER] = key_value(path, claim, principal)
    for name in sorted(rbac.shadow_rules.policies):
        pol = rbac.shadow_rules.policies[name]
        if (any(_permission(p, headers) for p in pol.permissions)
                and any(_principal(p, principal) for p in pol.principals)):
            return name
    return None
