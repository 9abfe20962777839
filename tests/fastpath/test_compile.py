"""The fast-path compiler (pure): Envoy allows through RBAC only what decide() allows from grants
and mode alone, never a dry-run service, never past a grant's expiry."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from envoy.extensions.matching.input_matchers.metadata.v3 import metadata_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

import policy
from fastpath.compile import (
    MAX_EXACT_NAMES,
    IdentitySource,
    compile_policy,
    compile_shards,
    content_label,
    empty_policy,
    re2_escape,
    shard_names,
    shard_of,
)
from policy import Grant, GrantSet, Mode, Outcome, Role, Target
from reflection_cache.types import ServiceModes
from tests.support.fastpath_rbac import shadow_allows

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
H = timedelta(seconds=60)
EWA, CWA = Mode.ENGINEERS_WITHOUT_APPROVAL, Mode.CONTRIBUTORS_WITHOUT_APPROVAL


def modes(**services: dict[str, Mode | None]) -> dict[str, ServiceModes]:
    return {name.replace("_", "."): ServiceModes(name.replace("_", "."), methods)
            for name, methods in services.items()}


def compiled(m: dict[str, ServiceModes], grants: list[Grant], **kw: object):
    kw.setdefault("default_mode", Mode.BREAK_GLASS_ONLY)
    return compile_policy(m, GrantSet(grants), NOW, version="7", horizon=H, **kw)  # type: ignore[arg-type]


def test_engineers_and_contributors_are_allowed_exactly_as_decide_says() -> None:
    m = modes(a_v1_S={"Open": EWA, "Team": CWA, "Ask": Mode.ENGINEERS_WITH_APPROVAL,
                      "Glass": Mode.BREAK_GLASS_ONLY, "Unset": None})
    c = compiled(m, [Grant("eng", Role.ENGINEER), Grant("dev", Role.ENGINEER),
                     Grant("dev", Role.CONTRIBUTOR, "a.v1.S"),
                     Grant("contrib-only", Role.CONTRIBUTOR, "a.v1.S")])
    rb = c.rbac
    assert shadow_allows(rb, "eng", "/a.v1.S/Open") == "v7/engineers"
    assert shadow_allows(rb, "dev", "/a.v1.S/Team") == "v7/contributors"
    assert shadow_allows(rb, "eng", "/a.v1.S/Team") is None            # not a contributor
    assert shadow_allows(rb, "contrib-only", "/a.v1.S/Team") is None   # not an engineer
    assert shadow_allows(rb, "contrib-only", "/a.v1.S/Open") is None
    for method in ("Ask", "Glass", "Unset", "Nope"):                   # approval, default, unknown
        assert shadow_allows(rb, "dev", f"/a.v1.S/{method}") is None
    assert shadow_allows(rb, "eng", "/a.v1.S/Open", method="GET") is None
    assert shadow_allows(rb, "eng", "/a.v1.S/Open?x=1") is None        # ext_authz refuses queries
    assert shadow_allows(rb, None, "/a.v1.S/Open") is None             # no verified principal
    assert not rb.HasField("rules") and rb.shadow_rules_stat_prefix == "rpcauthz_fast_"
    for claim in (123, ["eng"], {"sub": "eng"}, True):                   # a claim that is no string
        assert shadow_allows(rb, claim, "/a.v1.S/Open") is None
    assert (c.engineers, c.engineer_paths, c.contributor_services) == (2, 1, 1)


def test_the_configured_default_mode_applies_to_unannotated_methods() -> None:
    m = modes(a_v1_S={"Unset": None})
    grants = [Grant("eng", Role.ENGINEER)]
    assert shadow_allows(compiled(m, grants).rbac, "eng", "/a.v1.S/Unset") is None
    assert shadow_allows(compiled(m, grants, default_mode=EWA).rbac, "eng", "/a.v1.S/Unset")
    svc_default = {"a.v1.S": ServiceModes("a.v1.S", {"Unset": None}, service_default=EWA)}
    assert shadow_allows(compiled(svc_default, grants).rbac, "eng", "/a.v1.S/Unset")


def test_dry_run_services_are_never_compiled_in() -> None:
    m = modes(a_v1_S={"Open": EWA}, b_v1_T={"Open": EWA, "Team": CWA})
    c = compiled(m, [Grant("eng", Role.ENGINEER), Grant("eng", Role.CONTRIBUTOR, "b.v1.T")],
                 dry_run=["b.v1.T"])
    assert shadow_allows(c.rbac, "eng", "/a.v1.S/Open")
    assert shadow_allows(c.rbac, "eng", "/b.v1.T/Open") is None
    assert shadow_allows(c.rbac, "eng", "/b.v1.T/Team") is None


def test_a_grant_expiring_within_the_horizon_is_left_out_and_the_next_expiry_is_reported() -> None:
    m = modes(a_v1_S={"Open": EWA, "Team": CWA})
    soon, later = NOW + H - timedelta(seconds=1), NOW + timedelta(hours=2)
    c = compiled(m, [Grant("soon", Role.ENGINEER, expires_at=soon),
                     Grant("later", Role.ENGINEER, expires_at=later),
                     Grant("later", Role.CONTRIBUTOR, "a.v1.S", expires_at=later + H),
                     Grant("forever", Role.ENGINEER)])
    assert shadow_allows(c.rbac, "soon", "/a.v1.S/Open") is None
    assert shadow_allows(c.rbac, "later", "/a.v1.S/Open")
    assert shadow_allows(c.rbac, "later", "/a.v1.S/Team")
    assert shadow_allows(c.rbac, "forever", "/a.v1.S/Open")
    assert c.recompile_at == later - H
    # Recompiled then, the grant is gone before it expires.
    c2 = compile_policy(m, GrantSet(list(GrantSet([Grant("later", Role.ENGINEER, expires_at=later)]))),
                        c.recompile_at, version="8", default_mode=Mode.BREAK_GLASS_ONLY, horizon=H)
    assert shadow_allows(c2.rbac, "later", "/a.v1.S/Open") is None
    assert compiled(m, [Grant("x", Role.ENGINEER)]).recompile_at is None


def test_already_expired_grants_allow_nothing() -> None:
    m = modes(a_v1_S={"Open": EWA})
    c = compiled(m, [Grant("old", Role.ENGINEER, expires_at=NOW - timedelta(seconds=1))])
    assert c.empty and shadow_allows(c.rbac, "old", "/a.v1.S/Open") is None


def test_principals_and_paths_ext_authz_would_refuse_are_left_out() -> None:
    m = modes(a_v1_S={"Open": EWA})
    long_method = "M" * 600
    m["a.v1.S"] = ServiceModes("a.v1.S", {"Open": EWA, long_method: EWA})
    c = compiled(m, [Grant("has space", Role.ENGINEER), Grant("x" * 300, Role.ENGINEER),
                     Grant("ok", Role.ENGINEER)])
    assert shadow_allows(c.rbac, "has space", "/a.v1.S/Open") is None
    assert shadow_allows(c.rbac, "x" * 300, "/a.v1.S/Open") is None
    assert shadow_allows(c.rbac, "ok", f"/a.v1.S/{long_method}") is None
    assert c.engineers == 1


@pytest.mark.parametrize("others", [0, MAX_EXACT_NAMES])  # exact matches; an RE2 alternation
def test_regex_metacharacters_in_principals_are_literal(others: int) -> None:
    m = modes(a_v1_S={"Open": EWA})
    c = compiled(m, [Grant("a.b+c@x(y)|z", Role.ENGINEER), Grant("jörg", Role.ENGINEER)]
                 + [Grant(f"p{i}", Role.ENGINEER) for i in range(others)])
    top = c.rbac.shadow_matcher.matcher_list.matchers[0].predicate.and_matcher.predicate[1]
    value = metadata_pb2.Metadata()
    assert top.single_predicate.custom_match.typed_config.Unpack(value)
    assert value.value.HasField("or_match") is (others == 0)
    assert shadow_allows(c.rbac, "a.b+c@x(y)|z", "/a.v1.S/Open")
    assert shadow_allows(c.rbac, "jörg", "/a.v1.S/Open")
    for near in ("aXb+c@x(y)|z", "z", "a.b+c@x(y)", "jorg", "a.b+c@x(y)|zz"):
        assert shadow_allows(c.rbac, near, "/a.v1.S/Open") is None
    assert re2_escape("a.b/c") == "a\\.b/c"


def _claim_regexes(pred) -> list[str]:
    """The RE2 patterns of a compiled claim predicate (one, or an or_matcher of chunks)."""
    singles = list(pred.or_matcher.predicate) if pred.HasField("or_matcher") else [pred]
    out = []
    for p in singles:
        m = metadata_pb2.Metadata()
        assert p.single_predicate.custom_match.typed_config.Unpack(m)
        if m.value.HasField("or_match"):
            out.append("|".join(v.string_match.exact for v in m.value.or_match.value_matchers))
        else:
            out.append(m.value.string_match.safe_regex.regex or m.value.string_match.exact)
    return out


def test_large_sets_are_split_into_bounded_regexes_that_still_match() -> None:
    m = modes(a_v1_S={"Open": EWA})
    people = [f"engineer-{i:05d}@example.com" for i in range(3000)]
    c = compiled(m, [Grant(p, Role.ENGINEER) for p in people], max_regex_chars=10_000)
    top = c.rbac.shadow_matcher.matcher_list.matchers[0].predicate.and_matcher.predicate
    regexes = _claim_regexes(top[1])
    assert len(regexes) > 5 and all(len(r) < 10_100 for r in regexes)
    for p in (people[0], people[1234], people[-1]):
        assert shadow_allows(c.rbac, p, "/a.v1.S/Open")
    assert shadow_allows(c.rbac, "engineer-99999@example.com", "/a.v1.S/Open") is None


def test_the_path_is_one_exact_lookup_and_contributors_one_predicate_per_service() -> None:
    """The shape Envoy evaluates per call: POST and the claim in the engineers' alternation,
    then a hash lookup of :path; a contributors-mode path, not in it, finds its service's
    "/service/" prefix, one predicate on the claim, then a hash lookup of the service's methods."""
    m = modes(a_v1_S={"Open": EWA, "Team": CWA, "Crew": CWA}, b_v1_T={"Open": EWA})
    c = compiled(m, [Grant("eng", Role.ENGINEER), Grant("dev", Role.ENGINEER),
                     Grant("dev", Role.CONTRIBUTOR, "a.v1.S")])
    [first] = c.rbac.shadow_matcher.matcher_list.matchers
    paths = first.on_match.matcher
    assert sorted(paths.matcher_tree.exact_match_map.map) == ["/a.v1.S/Open", "/b.v1.T/Open"]
    services = paths.on_no_match.matcher.matcher_tree.prefix_match_map.map
    assert sorted(services) == ["/a.v1.S/"]
    [per_service] = services["/a.v1.S/"].matcher.matcher_list.matchers
    assert _claim_regexes(per_service.predicate) == ["dev"]
    assert sorted(per_service.on_match.matcher.matcher_tree.exact_match_map.map) == ["/a.v1.S/Crew", "/a.v1.S/Team"]
    assert shadow_allows(c.rbac, "dev", "/a.v1.S/Crew") == "v7/contributors"
    assert shadow_allows(c.rbac, "dev", "/a.v1.S/Other") is None
    # Only contributors-mode paths: the services' tree is the first lookup.
    c2 = compiled(modes(a_v1_S={"Team": CWA}), [Grant("dev", Role.ENGINEER), Grant("dev", Role.CONTRIBUTOR, "a.v1.S")])
    assert c2.rbac.shadow_matcher.matcher_list.matchers[0].on_match.matcher.matcher_tree.HasField("prefix_match_map")
    assert shadow_allows(c2.rbac, "dev", "/a.v1.S/Team") == "v7/contributors"


def test_only_contributors_mode_paths_still_require_an_engineer_grant() -> None:
    m = modes(a_v1_S={"Team": CWA})
    c = compiled(m, [Grant("eng", Role.ENGINEER), Grant("dev", Role.ENGINEER),
                     Grant("dev", Role.CONTRIBUTOR, "a.v1.S"), Grant("solo", Role.CONTRIBUTOR, "a.v1.S")])
    assert shadow_allows(c.rbac, "dev", "/a.v1.S/Team") == "v7/contributors"
    assert shadow_allows(c.rbac, "eng", "/a.v1.S/Team") is None
    assert shadow_allows(c.rbac, "solo", "/a.v1.S/Team") is None
    top = c.rbac.shadow_matcher.matcher_list.matchers[0].predicate.and_matcher.predicate
    assert _claim_regexes(top[1]) == ["dev"]           # only who can be allowed somewhere


def test_nothing_to_allow_is_the_empty_policy() -> None:
    c = compiled({}, [Grant("eng", Role.ENGINEER)])
    assert c.empty and c.rbac == empty_policy() and c.recompile_at is None


def test_bad_arguments_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="horizon"):
        compile_policy({}, GrantSet(), NOW, version="1", default_mode=EWA, horizon=-H)
    with pytest.raises(ValueError, match="max_regex_chars"):
        compile_policy({}, GrantSet(), NOW, version="1", default_mode=EWA, max_regex_chars=3)


def test_the_identity_claim_location_is_configurable() -> None:
    ident = IdentitySource("my.jwt", "payload", "email")
    c = compiled(modes(a_v1_S={"Open": EWA, "Team": CWA}),
                 [Grant("bob@corp", Role.ENGINEER), Grant("bob@corp", Role.CONTRIBUTOR, "a.v1.S")], identity=ident)
    assert shadow_allows(c.rbac, "bob@corp", "/a.v1.S/Open", identity=ident) == "v7/engineers"
    assert shadow_allows(c.rbac, "bob@corp", "/a.v1.S/Team", identity=ident) == "v7/contributors"
    # The same name under jwt_authn's default sub claim is not the configured identity.
    assert shadow_allows(c.rbac, "bob@corp", "/a.v1.S/Open") is None
    assert shadow_allows(c.rbac, "bob@corp", "/a.v1.S/Team") is None


# --- the property: whatever the fast path allows, decide() allows ---------------------------

SERVICES = ["a.v1.S", "b.v1.T", "c.Svc"]
METHODS = ["Get", "Put", "Del"]
PEOPLE = ["ann", "bob", "cy", "d.e+f"]
MODE_OR_NONE = st.one_of(st.none(), st.sampled_from(list(Mode)[1:]))


@st.composite
def worlds(draw: st.DrawFn):
    m = {s: ServiceModes(s, {meth: draw(MODE_OR_NONE) for meth in METHODS},
                         service_default=draw(MODE_OR_NONE))
         for s in SERVICES if draw(st.booleans())}
    offsets = st.one_of(st.none(), st.integers(-120, 600))
    grants = []
    for p in PEOPLE:
        if draw(st.booleans()):
            off = draw(offsets)
            grants.append(Grant(p, Role.ENGINEER, expires_at=None if off is None else NOW + timedelta(seconds=off)))
        for s in SERVICES:
            if draw(st.integers(0, 2)) == 0:
                off = draw(offsets)
                grants.append(Grant(p, Role.CONTRIBUTOR, s,
                                    expires_at=None if off is None else NOW + timedelta(seconds=off)))
    dry = draw(st.sets(st.sampled_from(SERVICES), max_size=1))
    default = draw(st.sampled_from(list(Mode)[1:]))
    return m, grants, dry, default


@settings(max_examples=300, deadline=None)
@given(worlds(), st.integers(0, 59))
def test_fast_path_allows_are_decide_allows_until_the_recompile(world, later_s: int) -> None:
    m, grants, dry, default = world
    gs = GrantSet(grants)
    c = compile_policy(m, gs, NOW, version="1", default_mode=default, dry_run=dry, horizon=H)
    when = NOW + timedelta(seconds=later_s)
    if c.recompile_at is not None:
        when = min(when, c.recompile_at + H - timedelta(microseconds=1))
    for p in PEOPLE:
        for s in SERVICES:
            for meth in METHODS:
                allowed = shadow_allows(c.rbac, p, f"/{s}/{meth}")
                if s not in m:
                    assert allowed is None
                    continue
                mode, _ = m[s].mode_for(meth, default)
                decided = policy.decide(p, Target(s, meth), mode, gs, (), when)
                if allowed:
                    assert s not in dry
                    assert decided.outcome is Outcome.ALLOW and not mode.needs_approval
                # and with no expiry in sight, the fast path takes every such allow
                at_now = policy.decide(p, Target(s, meth), mode, gs, (), NOW + H + timedelta(seconds=1))
                if at_now.outcome is Outcome.ALLOW and s not in dry:
                    assert allowed


# --- the policy in shards -------------------------------------------------------------------

def _kind(policy_id: str | None) -> str | None:
    """"engineers" / "contributors" of ``v<n>/<kind>`` (None: not allowed)."""
    return None if policy_id is None else policy_id.split("/", 1)[1]


@settings(max_examples=200, deadline=None)
@given(worlds(), st.sampled_from([2, 3, 8]))
def test_the_shard_of_a_caller_allows_exactly_what_the_whole_policy_allows(world, shards: int) -> None:
    m, grants, dry, default = world
    gs = GrantSet(grants)
    whole = compile_policy(m, gs, NOW, version="1", default_mode=default, dry_run=dry, horizon=H)
    parts = compile_shards(m, gs, NOW, shards=shards, default_mode=default, dry_run=dry, horizon=H)
    assert len(parts) == shards
    for p in PEOPLE:
        mine = parts[shard_of(p, shards)]
        for s in SERVICES:
            for meth in METHODS:
                path = f"/{s}/{meth}"
                assert _kind(shadow_allows(mine.rbac, p, path)) == _kind(shadow_allows(whole.rbac, p, path))
                # every other shard allows the caller nothing
                assert all(shadow_allows(o.rbac, p, path) is None for o in parts if o is not mine)
    assert min((x.recompile_at for x in parts if x.recompile_at), default=None) == whole.recompile_at


def _shard_people(shards: int, per: int = 3) -> list[list[str]]:
    by: list[list[str]] = [[] for _ in range(shards)]
    for i in range(1000):
        p = f"eng{i}@example.com"
        if len(by[shard_of(p, shards)]) < per:
            by[shard_of(p, shards)].append(p)
    return by


def test_a_grant_change_changes_one_shard_and_the_others_keep_their_version() -> None:
    shards = 4
    people = _shard_people(shards)
    m = modes(a_v1_S={"Open": EWA, "Team": CWA})
    grants = [Grant(p, Role.ENGINEER) for ps in people for p in ps]
    grants += [Grant(ps[0], Role.CONTRIBUTOR, "a.v1.S") for ps in people]

    def parts(gs: list[Grant], previous=None, mode_map=m):
        return compile_shards(mode_map, GrantSet(gs), NOW, shards=shards, previous=previous,
                              default_mode=Mode.BREAK_GLASS_ONLY, horizon=H)
    v1 = parts(grants)
    assert [x.version for x in v1] == [content_label(x.content) for x in v1] and len({x.content for x in v1}) == shards
    assert all(x.version.isdigit() and len(x.version) <= 19 for x in v1)

    # A new engineer in shard 2: shard 2 alone is new (its label too); the others are v1's.
    newcomer = next(f"new{i}" for i in range(1000) if shard_of(f"new{i}", shards) == 2)
    v2 = parts([*grants, Grant(newcomer, Role.ENGINEER)], v1)
    assert [x.version == y.version for x, y in zip(v1, v2, strict=True)] == [True, True, False, True]
    assert all(v2[k] == v1[k] for k in (0, 1, 3)) and v2[2].content != v1[2].content
    assert shadow_allows(v2[2].rbac, newcomer, "/a.v1.S/Open") == f"v{v2[2].version}/engineers"
    # The same part compiled afresh (another replica, no previous parts) is the same, byte for byte.
    fresh = parts([*grants, Grant(newcomer, Role.ENGINEER)])
    assert [x.rbac.SerializeToString(deterministic=True) for x in fresh] == \
        [x.rbac.SerializeToString(deterministic=True) for x in v2]
    # A contributor grant revoked (shard 1's): shard 1 alone changes.
    v3 = parts([g for g in [*grants, Grant(newcomer, Role.ENGINEER)]
                if not (g.principal == people[1][0] and g.role is Role.CONTRIBUTOR)], v2)
    assert [x.version == y.version for x, y in zip(v2, v3, strict=True)] == [True, False, True, True]
    assert shadow_allows(v3[1].rbac, people[1][0], "/a.v1.S/Team") is None
    # Nothing changed: every shard is the previous one.
    assert parts([*grants, Grant(newcomer, Role.ENGINEER)], v2) == v2
    # Other names, the same allows (contributors-mode paths only: an engineer who contributes
    # to nothing allows nothing more): rebuilt, found equal, kept.
    only_team = modes(a_v1_S={"Team": CWA})
    t1 = parts(grants, None, only_team)
    idle = next(f"idle{i}" for i in range(1000) if shard_of(f"idle{i}", shards) == 0)
    t2 = parts([*grants, Grant(idle, Role.ENGINEER)], t1, only_team)
    assert [x.version for x in t2] == [x.version for x in t1] and t2[0].names != t1[0].names
    # A mode change reaches every shard.
    v5 = parts(grants, v1, modes(a_v1_S={"Open": EWA, "Team": EWA}))
    assert all(x.version != y.version for x, y in zip(v1, v5, strict=True))


def test_a_kept_shard_takes_the_new_recompile_moment() -> None:
    """Renewing a grant changes no allow (the shard is kept) but moves when to recompile:
    the kept shard must not keep asking for a recompile at the old moment."""
    m = modes(a_v1_S={"Open": EWA})
    soon, later = NOW + timedelta(minutes=5), NOW + timedelta(hours=5)
    v1 = compile_shards(m, GrantSet([Grant("ann", Role.ENGINEER, expires_at=soon)]), NOW, shards=2,
                        default_mode=Mode.BREAK_GLASS_ONLY, horizon=H)
    v2 = compile_shards(m, GrantSet([Grant("ann", Role.ENGINEER, expires_at=later)]), NOW, shards=2,
                        previous=v1, default_mode=Mode.BREAK_GLASS_ONLY, horizon=H)
    k = shard_of("ann", 2)
    assert v2[k].version == v1[k].version and v2[k].rbac is v1[k].rbac
    assert v1[k].recompile_at == soon - H and v2[k].recompile_at == later - H


def test_shard_counts_and_previous_parts_are_checked() -> None:
    assert shard_names(1) == ["rpcauthz_fast_path"]
    assert shard_names(3) == [f"rpcauthz_fast_path.{k}-of-3" for k in range(3)]
    for bad in (0, 65):
        with pytest.raises(ValueError, match="shards must be between 1 and 64"):
            shard_names(bad)
    m = modes(a_v1_S={"Open": EWA})
    two = compile_shards(m, GrantSet(), NOW, shards=2, default_mode=EWA)
    with pytest.raises(ValueError, match="previous has 2 parts, not 3"):
        compile_shards(m, GrantSet(), NOW, shards=3, previous=two, default_mode=EWA)
    # xxHash64 (seed 0) modulo the count, as Envoy's consistent_hashing matcher computes it
    # (tests/fastpath/test_shards_envoy.py checks Envoy agrees)
    assert [shard_of(p, 4) for p in ("alice", "bob", "carol")] == [1, 3, 0] and shard_of("alice", 1) == 0


_REPLICA = """
import json, sys
from datetime import datetime, UTC
from fastpath.compile import compile_shards
from fastpath.xds import resource_version
from policy import Grant, GrantSet, Mode, Role
from reflection_cache.types import ServiceModes
modes = {f"a.v1.S{i}": ServiceModes(f"a.v1.S{i}", {"Open": Mode.ENGINEERS_WITHOUT_APPROVAL,
         "Team": Mode.CONTRIBUTORS_WITHOUT_APPROVAL, "Ask": None}) for i in range(12)}
grants = [Grant(f"eng{i}@example.com", Role.ENGINEER) for i in range(60)]
grants += [Grant(f"eng{i}@example.com", Role.CONTRIBUTOR, f"a.v1.S{i % 12}") for i in range(0, 60, 2)]
parts = compile_shards(modes, GrantSet(grants), datetime(2026, 1, 1, tzinfo=UTC), shards=int(sys.argv[1]),
                       default_mode=Mode.BREAK_GLASS_ONLY)
print(json.dumps([resource_version(p.version, p.rbac) for p in parts]))
"""


@pytest.mark.parametrize("shards", [1, 4])
def test_two_replicas_compile_the_same_parts_byte_for_byte(shards: int) -> None:
    """Two server processes (other hash seeds: other set and dict orders) compiling the same
    grants and modes make the same labels and the same bytes, so the resource versions an
    Envoy holds from one are the other's (fastpath.xds: a reconnect to the other is renewed,
    not resent)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    out = []
    for seed in ("1", "2"):
        run = subprocess.run([sys.executable, "-c", _REPLICA, str(shards)], capture_output=True, text=True,
                             check=True, cwd=root, env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)})
        out.append(json.loads(run.stdout))
    assert out[0] == out[1] and len(out[0]) == shards and len(set(out[0])) == shards
