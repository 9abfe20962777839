"""The fast-path compiler: modes + grants -> Envoy's RBAC filter config (shadow rules only).

A pure function of its arguments (no clock, no store, no network). It mirrors the two
branches of ``policy.decide()`` that allow from grants and mode alone:

* ``ENGINEERS_WITHOUT_APPROVAL``: the caller holds an unexpired engineer grant;
* ``CONTRIBUTORS_WITHOUT_APPROVAL``: the caller holds an unexpired engineer grant *and* an
  unexpired contributor grant of the method's service.

Everything else (denials, approval modes, break-glass, unknown services and methods,
dry-run services, paths the ext_authz server would refuse) is left out, so Envoy's shadow
result is "denied" and the call goes to ext_authz as before.

Expiry: a grant counts only if it is still valid ``horizon`` after ``now`` (the caller
makes the horizon cover the resource TTL plus push time). ``CompiledPolicy.recompile_at``
is the moment the policy must be replaced because an included grant is about to reach the
horizon; until then every allow in it is also an allow of ``decide()``.

Per-request cost in Envoy stays flat in the number of principals and paths: each set is
one RE2 alternation (``safe_regex``, split in chunks of at most ``max_regex_chars``), not a
list of thousands of matchers. Contributors of every service are one policy: a regex over
the header ``x-rpcauthz-fast-key`` (``:path SP principal``, set by Envoy, see
``envoy_config``) whose alternatives are ``/service/(methods) (contributors)``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from policy import GrantSet, Mode, Role
from reflection_cache.types import ServiceModes

#: RBAC shadow stats and dynamic-metadata key prefix (see docs/fastpath_contract).
SHADOW_PREFIX = "rpcauthz_fast_"
#: The ECDS resource name of the RBAC filter config.
RESOURCE_NAME = "rpcauthz_fast_path"
#: The request header Envoy sets (and removes before the upstream) to ``:path SP claim=principal``
#: (``key_value``), so one regex can test "this principal contributes to this path's service"
#: for every service. The claim's name is in the key: a gateway rendered for another claim than
#: the server compiles for never matches (fails closed).
KEY_HEADER = "x-rpcauthz-fast-key"


def key_value(path: str, claim: str, principal: str) -> str:
    """What Envoy puts in ``KEY_HEADER`` for a call (see fastpath/envoy_config.py)."""
    return f"{path} {claim}={principal}"

# The ext_authz server's own path and principal rules (extauthz/target.py, identity.py):
# anything they would refuse is never compiled in.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SERVICE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_METHOD = re.compile(_IDENT)
_PRINCIPAL = re.compile(r"[^\x00-\x20\x7f]+")
MAX_PRINCIPAL_LENGTH = 256


@dataclasses.dataclass(frozen=True, slots=True)
class IdentitySource:
    """Where Envoy finds the verified principal: jwt_authn's dynamic metadata
    ``namespace`` / ``payload_key`` / ``claim`` (the ext_authz server's ``identity``)."""

    namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    claim: str = "sub"


#: jwt_authn's payload ``sub`` claim, the ext_authz server's default identity.
JWT_SUB = IdentitySource()


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One compiled RBAC config and what it was compiled from."""

    rbac: http_rbac_pb2.RBAC
    version: str
    #: When an included grant comes within the horizon of its expiry (None: never).
    recompile_at: datetime | None
    engineer_paths: int
    engineers: int
    contributor_services: int
    contributor_principals: int

    @property
    def size_bytes(self) -> int:
        """The serialized size of the RBAC config (what one push carries)."""
        return int(self.rbac.ByteSize())

    @property
    def empty(self) -> bool:
        return not self.rbac.shadow_rules.policies


def empty_policy() -> http_rbac_pb2.RBAC:
    """The policy with no shadow policies: Envoy's shadow result is "denied" for every call,
    so every call goes to ext_authz (the ECDS default and what a NACK or a stale control
    plane falls back to)."""
    return http_rbac_pb2.RBAC(
        shadow_rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW),
        shadow_rules_stat_prefix=SHADOW_PREFIX)


def re2_escape(text: str) -> str:
    """``text`` as an RE2 literal: ASCII letters, digits, ``_`` and ``/`` as they are, other ASCII
    escaped with a backslash, anything else as ``\\x{HEX}``."""
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in "_/"):
            out.append(ch)
        elif ch.isascii() and 0x20 < ord(ch) < 0x7f:
            out.append("\\" + ch)
        else:
            out.append(f"\\x{{{ord(ch):x}}}")
    return "".join(out)


def alternations(literals: Iterable[str], max_chars: int) -> list[str]:
    """RE2 patterns that together fully match exactly ``literals`` (sorted, deduplicated),
    each an alternation of at most about ``max_chars`` characters."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for lit in sorted(set(literals)):
        escaped = re2_escape(lit)
        if current and size + len(escaped) + 1 > max_chars:
            chunks.append(current_pattern(current))
            current, size = [], 0
        current.append(escaped)
        size += len(escaped) + 1
    if current:
        chunks.append(current_pattern(current))
    return chunks


def current_pattern(escaped: list[str]) -> str:
    """One alternation of already-escaped literals."""
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


def usable_principal(principal: str) -> bool:
    """Would the ext_authz server accept this principal (extauthz/identity.py)?"""
    return len(principal) <= MAX_PRINCIPAL_LENGTH and _PRINCIPAL.fullmatch(principal) is not None


def usable_path(service: str, method: str, max_path_length: int) -> bool:
    """Would the ext_authz server parse ``/service/method`` as that target (extauthz/target.py)?"""
    return (_SERVICE.fullmatch(service) is not None and _METHOD.fullmatch(method) is not None
            and len(service) + len(method) + 2 <= max_path_length)


def compile_policy(modes: Mapping[str, ServiceModes], grants: GrantSet, now: datetime, *,
                   version: str, default_mode: Mode, dry_run: Iterable[str] = (),
                   horizon: timedelta = timedelta(seconds=60), identity: IdentitySource = JWT_SUB,
                   max_path_length: int = 512, max_regex_chars: int = 50_000) -> CompiledPolicy:
    """The RBAC config that allows exactly the calls ``decide()`` allows from grants and mode.

    ``modes``: what the reflection cache knows, by service; ``dry_run``: services in dry-run
    (never compiled in; a dry-run allow is audited as such by ext_authz). ``version`` names
    the policies (``v<version>/engineers``, ``v<version>/contributors``).
    """
    if horizon < timedelta(0):
        raise ValueError(f"horizon must not be negative, got {horizon}")
    if max_regex_chars < 64:
        raise ValueError(f"max_regex_chars must be at least 64, got {max_regex_chars}")
    skip = set(dry_run)
    cutoff = now + horizon
    engineer_paths: list[str] = []
    contributor_methods: dict[str, list[str]] = {}
    for service in sorted(modes):
        if service in skip:
            continue
        sm = modes[service]
        for method in sorted(sm.methods):
            if not usable_path(service, method, max_path_length):
                continue
            mode, _source = sm.mode_for(method, default_mode)
            if mode is Mode.ENGINEERS_WITHOUT_APPROVAL:
                engineer_paths.append(f"/{service}/{method}")
            elif mode is Mode.CONTRIBUTORS_WITHOUT_APPROVAL:
                contributor_methods.setdefault(service, []).append(method)

    # Grants valid past the cutoff; the earliest such expiry says when to recompile.
    engineers: dict[str, datetime | None] = {}
    contributors: dict[str, dict[str, datetime | None]] = {}
    for g in grants:
        if g.expires_at is not None and g.expires_at <= cutoff:
            continue
        if not usable_principal(g.principal):
            continue
        if g.role is Role.ENGINEER:
            engineers[g.principal] = g.expires_at
        elif g.role is Role.CONTRIBUTOR and g.service in contributor_methods:
            contributors.setdefault(g.service, {})[g.principal] = g.expires_at

    expiries: list[datetime] = []
    policies: dict[str, rbac_pb2.Policy] = {}
    if engineer_paths and engineers:
        policies[f"v{version}/engineers"] = _policy(
            _and(_post(), _any_regex(":path", alternations(engineer_paths, max_regex_chars))),
            _principal(identity, engineers, max_regex_chars))
        expiries += [e for e in engineers.values() if e is not None]
    # Contributors: one policy for every service, flat in their number. Its key is the header
    # Envoy builds before RBAC (``KEY_HEADER``: ":path SP claim=principal", see key_value());
    # the path must also be one of the compiled paths exactly, so the split is unambiguous.
    keys: list[str] = []
    paths: list[str] = []
    services_in = 0
    contributor_principals = 0
    for service, methods in contributor_methods.items():
        who = {p: _earliest(exp, engineers[p]) for p, exp in contributors.get(service, {}).items()
               if p in engineers}
        if not who:
            continue
        services_in += 1
        contributor_principals += len(who)
        path = re2_escape(f"/{service}/") + current_pattern([re2_escape(m) for m in methods])
        paths.append(path)
        keys.append(path + " " + re2_escape(identity.claim + "=")
                    + current_pattern([re2_escape(p) for p in sorted(who)]))
        expiries += [e for e in who.values() if e is not None]
    if keys:
        policies[f"v{version}/contributors"] = _policy(
            _and(_post(), _any_regex(":path", _joined(paths, max_regex_chars)),
                 _any_regex(KEY_HEADER, _joined(keys, max_regex_chars))),
            [_verified(identity)])

    rbac = empty_policy()
    for name, pol in policies.items():
        rbac.shadow_rules.policies[name].CopyFrom(pol)
    return CompiledPolicy(
        rbac=rbac, version=version,
        recompile_at=min(expiries) - horizon if expiries else None,
        engineer_paths=len(engineer_paths) if engineers else 0,
        engineers=len(engineers) if engineer_paths else 0,
        contributor_services=services_in,
        contributor_principals=contributor_principals)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _regex(pattern: str) -> regex_pb2.RegexMatcher:
    return regex_pb2.RegexMatcher(regex=pattern)


def _post() -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=rc.HeaderMatcher(
        name=":method", string_match=string_pb2.StringMatcher(exact="POST")))


def _any_regex(name: str, patterns: list[str]) -> rbac_pb2.Permission:
    perms = [rbac_pb2.Permission(header=rc.HeaderMatcher(
        name=name, string_match=string_pb2.StringMatcher(safe_regex=_regex(p)))) for p in patterns]
    if len(perms) == 1:
        return perms[0]
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=perms))


def _and(*perms: rbac_pb2.Permission) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=list(perms)))


def _joined(alternatives: list[str], max_chars: int) -> list[str]:
    """Already-escaped alternatives as a few alternations of at most about ``max_chars``."""
    chunks: list[list[str]] = [[]]
    size = 0
    for alt in alternatives:
        if chunks[-1] and size + len(alt) > max_chars:
            chunks.append([])
            size = 0
        chunks[-1].append(alt)
        size += len(alt) + 1
    return [current_pattern(chunk) for chunk in chunks]


def _verified(identity: IdentitySource) -> rbac_pb2.Principal:
    """Any caller whose verified token has a string principal claim (the key header holds the
    claim as text; a number or a missing claim must not pass as a principal's name)."""
    return rbac_pb2.Principal(sourced_metadata=rbac_pb2.SourcedMetadata(
        metadata_source=rbac_pb2.DYNAMIC,
        metadata_matcher=metadata_pb2.MetadataMatcher(
            filter=identity.namespace,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=identity.payload_key),
                  metadata_pb2.MetadataMatcher.PathSegment(key=identity.claim)],
            value=_string_value(r"[^\x00-\x20\x7f]{1,256}"))))


def _principal(identity: IdentitySource, who: Mapping[str, object], max_chars: int
               ) -> list[rbac_pb2.Principal]:
    """One metadata principal per regex chunk (RBAC ORs a policy's principals)."""
    return [rbac_pb2.Principal(sourced_metadata=rbac_pb2.SourcedMetadata(
        metadata_source=rbac_pb2.DYNAMIC,
        metadata_matcher=metadata_pb2.MetadataMatcher(
            filter=identity.namespace,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=identity.payload_key),
                  metadata_pb2.MetadataMatcher.PathSegment(key=identity.claim)],
            value=_string_value(pattern))))
        for pattern in alternations(who, max_chars)]


def _string_value(pattern: str) -> value_pb2.ValueMatcher:
    return value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(safe_regex=_regex(pattern)))


def _policy(permission: rbac_pb2.Permission, principals: list[rbac_pb2.Principal]) -> rbac_pb2.Policy:
    return rbac_pb2.Policy(permissions=[permission], principals=principals)
