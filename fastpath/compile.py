"""The fast-path compiler: modes + grants -> Envoy's RBAC filter config (a shadow matcher only).

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

The config is the RBAC filter's ``shadow_matcher`` (the unified matcher API,
``xds.type.matcher.v3.Matcher``), so the per-request cost in Envoy stays flat in the number
of principals and paths and needs nothing but the request's ``:method``, ``:path`` and the
verified claim in jwt_authn's dynamic metadata (no header built for it)::

    :method == POST  AND  claim in ENGINEERS      (RE2 alternations; up to 16 names: exact)
      -> :path in a hash map of the ENGINEERS_WITHOUT_APPROVAL paths -> ALLOW "v<n>/engineers"
      -> else its "/service/" prefix in a trie of the services with CONTRIBUTORS_WITHOUT_APPROVAL
         methods -> claim in CONTRIBUTORS(service) -> :path in a hash map of those methods
         -> ALLOW "v<n>/contributors"
    anything else: no match -> the shadow result is "denied" -> ext_authz

The claim is matched as a string value (``envoy.matching.matchers.metadata_matcher``): a
number, a list or a missing claim never matches.

Sharded (``compile_shards``): the policy in parts by a hash of the principal, each part an
ECDS resource of its own with every path and only its principals; Envoy runs for each call
the one part its claim hashes to. A grant change then changes (and resends) one part.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import xxhash
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.matching.input_matchers.metadata.v3 import metadata_pb2 as metadata_matcher_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2, string_pb2, value_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2

from policy import GrantSet, Mode, Role
from policy.model import METHOD_NAME, SERVICE_NAME
from policy.principals import usable_principal
from reflection_cache.types import ServiceModes

#: RBAC shadow stats and dynamic-metadata key prefix (see docs/fastpath_contract).
SHADOW_PREFIX = "rpcauthz_fast_"
#: The ECDS resource name of the RBAC filter config (and, sharded, of the dispatching filter).
RESOURCE_NAME = "rpcauthz_fast_path"
#: The most shards a policy may be split into (one ECDS resource and one dispatch rule each).
MAX_SHARDS = 64



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
    #: What its policy names say (``v<version>/engineers``): ``compile_shards``' parts carry
    #: ``content_label(content)``, ``compile_policy`` the version it is given.
    version: str
    #: When an included grant comes within the horizon of its expiry (None: never).
    recompile_at: datetime | None
    engineer_paths: int
    engineers: int
    contributor_services: int
    contributor_principals: int
    #: What the config allows, independent of ``version`` (sha256 of the config compiled with
    #: an empty version): equal contents mean Envoy need not be sent it again.
    content: str = ""
    #: The names it was compiled from (paths, principals; ``compile_shards`` only): equal
    #: names make an equal config, so an unchanged part is not even rebuilt.
    names: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def size_bytes(self) -> int:
        """The serialized size of the RBAC config (what one push carries)."""
        return int(self.rbac.ByteSize())

    @property
    def empty(self) -> bool:
        """Allows nothing (the empty policy)."""
        return not self.rbac.HasField("shadow_matcher")


def empty_policy() -> http_rbac_pb2.RBAC:
    """The policy with no shadow rules: Envoy's shadow result is "denied" for every call,
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


def usable_path(service: str, method: str, max_path_length: int) -> bool:
    """Would the ext_authz server parse ``/service/method`` as that target (extauthz/target.py,
    whose name rules these are: anything it would refuse is never compiled in)?"""
    return (SERVICE_NAME.fullmatch(service) is not None and METHOD_NAME.fullmatch(method) is not None
            and len(service) + len(method) + 2 <= max_path_length)


@dataclasses.dataclass(frozen=True, slots=True)
class _Inputs:
    """What a policy is built of: the paths by mode and the usable grants past the cutoff."""

    engineer_paths: list[str]
    contributor_methods: dict[str, list[str]]
    engineers: dict[str, datetime | None]
    contributors: dict[str, dict[str, datetime | None]]

    def only(self, keep: Callable[[str], bool]) -> _Inputs:
        """The same paths, with the grants of the principals ``keep`` accepts."""
        return _Inputs(self.engineer_paths, self.contributor_methods,
                       {p: e for p, e in self.engineers.items() if keep(p)},
                       {s: {p: e for p, e in who.items() if keep(p)} for s, who in self.contributors.items()})

    def names(self, paths: object) -> tuple[object, ...]:
        """Everything the built config depends on but the expiries (``paths``: the paths'
        part, the same for every shard, computed once by ``paths_key``)."""
        return (paths, frozenset(self.engineers),
                frozenset((s, frozenset(who)) for s, who in self.contributors.items() if who))

    def paths_key(self) -> tuple[object, ...]:
        return (tuple(self.engineer_paths), tuple((s, tuple(m)) for s, m in self.contributor_methods.items()))

    def expiries(self) -> list[datetime]:
        """The expiries of the grants a built config relies on (see ``_build``)."""
        out: list[datetime] = []
        if self.engineers and self.engineer_paths:
            out += [e for e in self.engineers.values() if e is not None]
        for service in self.contributor_methods:
            for p, exp in self.contributors.get(service, {}).items():
                if p in self.engineers:
                    e = _earliest(exp, self.engineers[p])
                    if e is not None:
                        out.append(e)
        return out


def _inputs(modes: Mapping[str, ServiceModes], grants: GrantSet, cutoff: datetime, default_mode: Mode,
            dry_run: Iterable[str], max_path_length: int) -> _Inputs:
    skip = set(dry_run)
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
    return _Inputs(engineer_paths, contributor_methods, engineers, contributors)


def _check_limits(horizon: timedelta, max_regex_chars: int) -> None:
    if horizon < timedelta(0):
        raise ValueError(f"horizon must not be negative, got {horizon}")
    if max_regex_chars < 64:
        raise ValueError(f"max_regex_chars must be at least 64, got {max_regex_chars}")


def compile_policy(modes: Mapping[str, ServiceModes], grants: GrantSet, now: datetime, *,
                   version: str, default_mode: Mode, dry_run: Iterable[str] = (),
                   horizon: timedelta = timedelta(seconds=60), identity: IdentitySource = JWT_SUB,
                   max_path_length: int = 512, max_regex_chars: int = 50_000) -> CompiledPolicy:
    """The RBAC config that allows exactly the calls ``decide()`` allows from grants and mode.

    ``modes``: what the reflection cache knows, by service; ``dry_run``: services in dry-run
    (never compiled in; a dry-run allow is audited as such by ext_authz). ``version`` names
    the matcher's actions (``v<version>/engineers``, ``v<version>/contributors``), which
    Envoy reports as the shadow effective policy id.
    """
    _check_limits(horizon, max_regex_chars)
    inputs = _inputs(modes, grants, now + horizon, default_mode, dry_run, max_path_length)
    return _build(inputs, version, horizon, identity, max_regex_chars)


def shard_of(principal: str, shards: int) -> int:
    """The shard whose RBAC config decides ``principal``'s calls: xxHash64 (seed 0) of the
    claim's UTF-8 bytes modulo ``shards``, as Envoy's ``consistent_hashing`` input matcher
    computes it on the claim header (``fastpath.envoy_config.dispatch_filter``)."""
    return 0 if shards == 1 else xxhash.xxh64_intdigest(principal.encode("utf-8", "surrogatepass")) % shards


def shard_names(shards: int) -> list[str]:
    """The ECDS resource names of a policy in ``shards`` parts: ``RESOURCE_NAME`` alone when
    unsharded, else ``rpcauthz_fast_path.<k>-of-<shards>`` (the count in the name, so an
    Envoy rendered for another count subscribes to names this server does not serve: no
    fast path there, rather than principals looked up in the wrong shard)."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    return [RESOURCE_NAME] if shards == 1 else [f"{RESOURCE_NAME}.{k}-of-{shards}" for k in range(shards)]


def content_label(content: str) -> str:
    """The label a part's policy names carry (``v<label>/engineers``), from its ``content``
    (the sha256 of its config compiled with an empty version): 60 bits of it in decimal. A
    function of what the part allows alone, so every replica and every restart of the
    server names an equal part alike, and builds it byte for byte alike."""
    return str(int(content[:15], 16))


def compile_shards(modes: Mapping[str, ServiceModes], grants: GrantSet, now: datetime, *,
                   shards: int, previous: Sequence[CompiledPolicy] | None = None,
                   default_mode: Mode, dry_run: Iterable[str] = (),
                   horizon: timedelta = timedelta(seconds=60), identity: IdentitySource = JWT_SUB,
                   max_path_length: int = 512, max_regex_chars: int = 50_000) -> list[CompiledPolicy]:
    """The policy in ``shards`` parts, part ``k`` holding the grants of the principals with
    ``shard_of(principal) == k`` (the paths in every part). Together they allow exactly
    what ``compile_policy`` allows: Envoy runs, for each call, the part its claim hashes to.

    Each part is labelled by its content (``content_label``): the same part has the same
    label, and the same bytes, in every server process.

    ``previous``: the last parts published. A part whose content is unchanged is that
    previous part (with this compile's ``recompile_at``), so a grant change is one part's
    update, not a resend of the whole policy.
    """
    _check_limits(horizon, max_regex_chars)
    names = shard_names(shards)
    if previous is not None and len(previous) != len(names):
        raise ValueError(f"previous has {len(previous)} parts, not {len(names)}")
    inputs = _inputs(modes, grants, now + horizon, default_mode, dry_run, max_path_length)
    of = {p: shard_of(p, shards) for p in inputs.engineers}
    paths = inputs.paths_key()
    out = []
    for k in range(len(names)):
        part = inputs if shards == 1 else inputs.only(_in_shard(of, k))
        key = part.names(paths)
        before = previous[k] if previous is not None else None
        if before is not None and before.names == key:
            # the same names, the same allows; the expiries (and so recompile_at) may have moved
            expiries = part.expiries()
            out.append(dataclasses.replace(before, recompile_at=min(expiries) - horizon if expiries else None))
            continue
        unversioned = _build(part, "", horizon, identity, max_regex_chars)
        if before is not None and before.content == unversioned.content:
            out.append(dataclasses.replace(before, recompile_at=unversioned.recompile_at, names=key))
        else:
            versioned = _build(part, content_label(unversioned.content), horizon, identity, max_regex_chars)
            out.append(dataclasses.replace(versioned, content=unversioned.content, names=key))
    return out


def _in_shard(of: Mapping[str, int], k: int) -> Callable[[str], bool]:
    return lambda principal: of.get(principal) == k


def config_digest(rbac: http_rbac_pb2.RBAC) -> str:
    """The sha256 (hex) of ``rbac``'s deterministic serialization: equal digests, equal bytes."""
    return hashlib.sha256(rbac.SerializeToString(deterministic=True)).hexdigest()


def _build(inputs: _Inputs, version: str, horizon: timedelta, identity: IdentitySource,
           max_regex_chars: int) -> CompiledPolicy:
    """The RBAC config of ``inputs`` (see the module's docstring for its shape); its
    ``content`` is filled only when ``version`` is empty (the unversioned build)."""
    engineer_paths, contributor_methods = inputs.engineer_paths, inputs.contributor_methods
    engineers, contributors = inputs.engineers, inputs.contributors
    eng_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    if engineers and engineer_paths:
        allow = _allow(f"v{version}/engineers")
        for path in engineer_paths:
            eng_map[path] = allow
    # Contributors: per service (its "/service/" prefix) one predicate on the claim, then the
    # service's contributors-mode methods. Contributors must hold an engineer grant too
    # (decide()'s rule): the engineers' predicate ahead of everything already requires it;
    # the intersection keeps each alternation (and recompile_at) to whom it can allow.
    svc_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    contributor_principals = 0
    contributing: set[str] = set()
    for service, methods in contributor_methods.items():
        who = {p: _earliest(exp, engineers[p]) for p, exp in contributors.get(service, {}).items()
               if p in engineers}
        if not who:
            continue
        contributor_principals += len(who)
        contributing.update(who)
        allow = _allow(f"v{version}/contributors")
        methods_tree = _path_tree(exact={f"/{service}/{m}": allow for m in methods})
        svc_map[f"/{service}/"] = matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher(
            matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[matcher_pb2.Matcher.MatcherList.FieldMatcher(
                predicate=_claim_in(identity, who, max_regex_chars),
                on_match=matcher_pb2.Matcher.OnMatch(matcher=methods_tree))])))

    rbac = empty_policy()
    if eng_map or svc_map:
        # Who passes the first predicate: every engineer if an engineers-mode path is in, else
        # only the contributors above.
        callers = set(engineers) if eng_map else contributing
        by_service = _path_tree(prefix=svc_map) if svc_map else None
        paths = _path_tree(exact=eng_map) if eng_map else by_service
        assert paths is not None
        if eng_map and by_service is not None:  # not an engineers-mode path: try the services
            paths.on_no_match.matcher.CopyFrom(by_service)
        first = matcher_pb2.Matcher.MatcherList.FieldMatcher(
            predicate=_all(_header_is(":method", "POST"), _claim_in(identity, callers, max_regex_chars)),
            on_match=matcher_pb2.Matcher.OnMatch(matcher=paths))
        rbac.ClearField("shadow_rules")
        rbac.shadow_matcher.matcher_list.matchers.append(first)
    return CompiledPolicy(
        rbac=rbac, version=version,
        recompile_at=min(expiries) - horizon if (expiries := inputs.expiries()) else None,
        engineer_paths=len(engineer_paths) if engineers else 0,
        engineers=len(engineers) if engineer_paths else 0,
        contributor_services=len(svc_map),
        contributor_principals=contributor_principals,
        content=config_digest(rbac) if not version else "")


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _allow(name: str) -> matcher_pb2.Matcher.OnMatch:
    """The RBAC action ALLOW, reported as the effective policy id ``name``."""
    config = extension_pb2.TypedExtensionConfig(name="allow")
    config.typed_config.Pack(rbac_pb2.Action(name=name, action=rbac_pb2.RBAC.ALLOW))
    return matcher_pb2.Matcher.OnMatch(action=config)


def _path_tree(*, exact: Mapping[str, matcher_pb2.Matcher.OnMatch] | None = None,
               prefix: Mapping[str, matcher_pb2.Matcher.OnMatch] | None = None) -> matcher_pb2.Matcher:
    """A hash (``exact``) or trie (``prefix``) lookup of ``:path``; no entry: no match."""
    tree = matcher_pb2.Matcher.MatcherTree(input=_header_input(":path"))
    table = tree.exact_match_map.map if exact is not None else tree.prefix_match_map.map
    for key, on_match in (exact if exact is not None else prefix or {}).items():
        table[key].CopyFrom(on_match)
    return matcher_pb2.Matcher(matcher_tree=tree)


def _header_input(header: str) -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name=header)
    config.typed_config.Pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header))
    return config


def _header_is(header: str, value: str) -> matcher_pb2.Matcher.MatcherList.Predicate:
    return matcher_pb2.Matcher.MatcherList.Predicate(
        single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
            input=_header_input(header), value_match=xds_string_pb2.StringMatcher(exact=value)))


def _all(*predicates: matcher_pb2.Matcher.MatcherList.Predicate) -> matcher_pb2.Matcher.MatcherList.Predicate:
    return matcher_pb2.Matcher.MatcherList.Predicate(
        and_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(predicate=list(predicates)))


#: Up to this many names, a set is a list of exact string matches (no RE2 program: a
#: service's few contributors cost Envoy far less memory that way); above, RE2 alternations.
MAX_EXACT_NAMES = 16


def _claim_in(identity: IdentitySource, who: Iterable[str], max_chars: int
              ) -> matcher_pb2.Matcher.MatcherList.Predicate:
    """The verified claim (a string) is one of ``who``: one metadata predicate with exact
    matches of a few names, else one per regex chunk, ORed."""
    claim = extension_pb2.TypedExtensionConfig(name="claim")
    claim.typed_config.Pack(network_inputs_pb2.DynamicMetadataInput(
        filter=identity.namespace,
        path=[network_inputs_pb2.DynamicMetadataInput.PathSegment(key=identity.payload_key),
              network_inputs_pb2.DynamicMetadataInput.PathSegment(key=identity.claim)]))
    names = sorted(set(who))
    if len(names) <= MAX_EXACT_NAMES:
        exact = [value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=n)) for n in names]
        values = [exact[0] if len(exact) == 1 else value_pb2.ValueMatcher(
            or_match=value_pb2.OrMatcher(value_matchers=exact))]
    else:
        values = [value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=pattern))) for pattern in alternations(names, max_chars)]
    predicates = []
    for value in values:
        matcher = extension_pb2.TypedExtensionConfig(name="in")
        matcher.typed_config.Pack(metadata_matcher_pb2.Metadata(value=value))
        predicates.append(matcher_pb2.Matcher.MatcherList.Predicate(
            single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                input=claim, custom_match=matcher)))
    if len(predicates) == 1:
        return predicates[0]
    return matcher_pb2.Matcher.MatcherList.Predicate(
        or_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(predicate=predicates))
