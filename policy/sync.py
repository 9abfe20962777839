"""Ownership and on-call sync: Backstage-style catalog YAML and an on-call file -> grants.

Catalog rules (what ``mpactl sync --catalog`` grants):

- A ``kind: Component`` with the annotation ``rpcauthz.io/grpc-services: "pkg.v1.Svc, pkg.v1.Other"``
  owns those gRPC services. Its ``spec.owner`` is an entity reference to a Group
  (``payments``, ``group:payments``, ``group:default/payments``) or a User (``user:jdoe``).
- Every member of the owning group (or the owning user) gets a CONTRIBUTOR grant for
  each of the component's services.
- Every member of any Group gets an ENGINEER grant: being in the engineering org's
  catalog is what makes someone an engineer.
- A group's members are its ``spec.members`` plus every User whose ``spec.memberOf``
  names it. Child groups (``spec.children``) are not expanded.
- A User's principal (the identity the gateway sees in the JWT) is ``spec.profile.email``.

On-call file (``mpactl sync --oncall``)::

    security_oncall:
      - alice@example.com                       # until removed from the file
      - principal: bob@example.com
        until: 2026-12-01T09:00:00Z             # expires then, even if the file is not synced

Each source replaces only its own grants (``sync:catalog``, ``sync:oncall``); manual
grants are never touched. Malformed input raises ``SyncError`` naming the file (and
line, where the YAML gives one); nothing is written then.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from .model import Grant, Role, Target
from .store import GrantDiff, Store
from .stores import plan_replace

CATALOG_SOURCE = "sync:catalog"
ONCALL_SOURCE = "sync:oncall"
SERVICES_ANNOTATION = "rpcauthz.io/grpc-services"
_USED_KINDS = {"component", "group", "user"}
#: libyaml's loader when PyYAML was built with it (about 10x faster on a large catalog),
#: else the pure-Python one; both give the same documents, marks and errors.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_REF = re.compile(r"^(?:(?P<kind>[A-Za-z]+):)?(?:(?P<ns>[^:/\s]+)/)?(?P<name>[^:/\s]+)$")


class SyncError(ValueError):
    """The catalog or on-call input is malformed; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Entity:
    kind: str        # lower case: component, group, user
    namespace: str   # lower case
    name: str        # lower case
    spec: dict[str, Any]
    metadata: dict[str, Any]
    where: str       # "path:line"

    @property
    def ref(self) -> str:
        return f"{self.kind}:{self.namespace}/{self.name}"


def parse_ref(text: Any, default_kind: str, where: str, what: str) -> tuple[str, str, str]:
    """An entity reference ``[kind:][namespace/]name`` as lower-case (kind, namespace, name)."""
    if not isinstance(text, str) or not (m := _REF.match(text.strip())):
        raise SyncError(f"{where}: {what} {text!r} is not an entity reference "
                        "like 'payments', 'group:payments' or 'group:default/payments'")
    return ((m["kind"] or default_kind).lower(), (m["ns"] or "default").lower(), m["name"].lower())


# --- reading YAML ---------------------------------------------------------------------------

def yaml_files(paths: Iterable[str | Path]) -> list[Path]:
    """The YAML files named, and every ``*.yaml``/``*.yml`` under named directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
            if not files:
                raise SyncError(f"{p}: directory holds no .yaml or .yml files")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise SyncError(f"{p}: no such file or directory")
    return found


def _documents(path: Path) -> list[tuple[Any, int]]:
    """Every YAML document in ``path`` with the line it starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SyncError(f"{path}: cannot read: {e}") from None
    loader = _LOADER(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # check_node() said there is one
                break
            docs.append((loader.construct_document(node), node.start_mark.line + 1))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SyncError(f"{path}{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SyncError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return docs


def load_entities(paths: Sequence[str | Path]) -> list[Entity]:
    """The Component, Group and User entities of the catalog files (others are skipped)."""
    entities: list[Entity] = []
    seen: dict[str, str] = {}
    for path in yaml_files(paths):
        for doc, line in _documents(path):
            where = f"{path}:{line}"
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise SyncError(f"{where}: a catalog entity must be a mapping, got {type(doc).__name__}")
            kind = doc.get("kind")
            if not isinstance(kind, str) or not kind:
                raise SyncError(f"{where}: entity has no 'kind'")
            if kind.lower() not in _USED_KINDS:
                continue
            metadata = doc.get("metadata")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) \
                    or not metadata["name"].strip():
                raise SyncError(f"{where}: {kind} has no metadata.name")
            spec = doc.get("spec") or {}
            if not isinstance(spec, dict):
                raise SyncError(f"{where}: {kind} {metadata['name']}: spec must be a mapping")
            namespace = metadata.get("namespace") or "default"
            e = Entity(kind.lower(), str(namespace).lower(), metadata["name"].strip().lower(),
                       spec, metadata, where)
            if e.ref in seen:
                raise SyncError(f"{where}: duplicate entity {e.ref} (first defined at {seen[e.ref]})")
            seen[e.ref] = where
            entities.append(e)
    return entities


# --- catalog -> grants ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CatalogGrants:
    """What the catalog says: the grants, and which component owns each gRPC service."""

    grants: tuple[Grant, ...]
    owners: dict[str, str]  # gRPC service -> component ref


def catalog_grants(paths: Sequence[str | Path]) -> CatalogGrants:
    """Read the catalog files and compute the ``sync:catalog`` grants (see module doc)."""
    entities = load_entities(paths)
    if not entities:
        raise SyncError(f"{', '.join(map(str, paths))}: no Component, Group or User entities found")
    users = {e.ref: e for e in entities if e.kind == "user"}
    groups = {e.ref: e for e in entities if e.kind == "group"}

    def principal_of(user_ref: str, where: str) -> str:
        user = users.get(user_ref)
        if user is None:
            raise SyncError(f"{where}: unknown user {user_ref} (no kind: User entity with that name)")
        profile = user.spec.get("profile") or {}
        email = profile.get("email") if isinstance(profile, dict) else None
        if not isinstance(email, str) or "@" not in email:
            raise SyncError(f"{user.where}: {user.ref} has no spec.profile.email, which is the "
                            "principal the gateway sees")
        return email.strip()

    members: dict[str, set[str]] = {ref: set() for ref in groups}
    for g in groups.values():
        raw = g.spec.get("members") or []
        if not isinstance(raw, list):
            raise SyncError(f"{g.where}: {g.ref}: spec.members must be a list")
        for m in raw:
            kind, ns, name = parse_ref(m, "user", g.where, f"{g.ref} member")
            if kind != "user":
                raise SyncError(f"{g.where}: {g.ref} member {m!r} is not a user")
            members[g.ref].add(principal_of(f"user:{ns}/{name}", g.where))
    for u in users.values():
        raw = u.spec.get("memberOf") or []
        if not isinstance(raw, list):
            raise SyncError(f"{u.where}: {u.ref}: spec.memberOf must be a list")
        for ref in raw:
            kind, ns, name = parse_ref(ref, "group", u.where, f"{u.ref} memberOf")
            group_ref = f"{kind}:{ns}/{name}"
            if group_ref not in groups:
                raise SyncError(f"{u.where}: {u.ref} is memberOf unknown group {group_ref}")
            members[group_ref].add(principal_of(u.ref, u.where))

    grants: dict[tuple[str, str, str], Grant] = {}

    def add(g: Grant) -> None:
        grants[g.key] = g

    for principals in members.values():
        for p in principals:
            add(Grant(p, Role.ENGINEER, source=CATALOG_SOURCE))

    owners: dict[str, str] = {}
    for c in (e for e in entities if e.kind == "component"):
        annotations = c.metadata.get("annotations") or {}
        raw = annotations.get(SERVICES_ANNOTATION) if isinstance(annotations, dict) else None
        if raw is None:
            continue
        if not isinstance(raw, str):
            raise SyncError(f"{c.where}: {c.ref}: annotation {SERVICES_ANNOTATION} must be a "
                            "string like \"pkg.v1.Svc, pkg.v1.Other\"")
        services = [s.strip() for s in raw.split(",") if s.strip()]
        if not services:
            raise SyncError(f"{c.where}: {c.ref}: annotation {SERVICES_ANNOTATION} names no service")
        for s in services:
            try:
                Target(s, "Method")
            except ValueError:
                raise SyncError(f"{c.where}: {c.ref}: {s!r} in {SERVICES_ANNOTATION} is not a "
                                "fully-qualified gRPC service name like pkg.v1.Service") from None
            if s in owners:
                raise SyncError(f"{c.where}: {c.ref} claims gRPC service {s}, already owned by "
                                f"{owners[s]}")
            owners[s] = c.ref
        if "owner" not in c.spec:
            raise SyncError(f"{c.where}: {c.ref} has no spec.owner")
        kind, ns, name = parse_ref(c.spec["owner"], "group", c.where, f"{c.ref} owner")
        owner_ref = f"{kind}:{ns}/{name}"
        if kind == "group":
            if owner_ref not in groups:
                raise SyncError(f"{c.where}: {c.ref} is owned by unknown group {owner_ref}")
            contributors = members[owner_ref]
        elif kind == "user":
            contributors = {principal_of(owner_ref, c.where)}
        else:
            raise SyncError(f"{c.where}: {c.ref} owner {c.spec['owner']!r} is neither a group nor a user")
        for p in contributors:
            for s in services:
                add(Grant(p, Role.CONTRIBUTOR, service=s, source=CATALOG_SOURCE))
    return CatalogGrants(tuple(sorted(grants.values(), key=lambda g: g.key)), owners)


# --- on-call --------------------------------------------------------------------------------

def oncall_grants(path: str | Path) -> tuple[Grant, ...]:
    """The ``sync:oncall`` SECURITY_ONCALL grants listed in the on-call file."""
    path = Path(path)
    if not path.is_file():
        raise SyncError(f"{path}: no such file")
    docs = [(d, line) for d, line in _documents(path) if d is not None]
    if len(docs) != 1:
        raise SyncError(f"{path}: expected one YAML document with a security_oncall list")
    doc, line = docs[0]
    entries = doc.get("security_oncall") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and set(doc) - {"security_oncall"}:
        raise SyncError(f"{path}:{line}: unknown keys {sorted(set(doc) - {'security_oncall'})}; "
                        "expected only security_oncall")
    if not isinstance(entries, list):
        raise SyncError(f"{path}:{line}: security_oncall must be a list of principals")
    grants: dict[str, Grant] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{path}: security_oncall entry {i}"
        until = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"principal", "until"}
            if unknown:
                raise SyncError(f"{where}: unknown keys {sorted(unknown)}; expected principal, until")
            principal, until = entry.get("principal"), entry.get("until")
        else:
            principal = entry
        if not isinstance(principal, str) or not principal.strip():
            raise SyncError(f"{where}: needs a principal (e.g. alice@example.com)")
        principal = principal.strip()
        if principal in grants:
            raise SyncError(f"{where}: {principal} is listed twice")
        grants[principal] = Grant(principal, Role.SECURITY_ONCALL,
                                  expires_at=_until(until, where), source=ONCALL_SOURCE)
    return tuple(grants[p] for p in sorted(grants))


def _until(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise SyncError(f"{where}: until {value!r} is not an ISO 8601 time") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        raise SyncError(f"{where}: until {value} needs a time and timezone, e.g. {value}T09:00:00Z")
    if not isinstance(value, datetime):
        raise SyncError(f"{where}: until must be a time like 2026-12-01T09:00:00Z")
    if value.tzinfo is None:
        raise SyncError(f"{where}: until {value.isoformat()} needs a timezone, e.g. "
                        f"{value.isoformat()}Z")
    return value


# --- applying -------------------------------------------------------------------------------

def input_digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the YAML files ``paths`` name (directories searched as the sync does),
    their paths and contents, in order."""
    h = hashlib.sha256()
    for f in yaml_files(paths):
        try:
            data = f.read_bytes()
        except OSError as e:
            raise SyncError(f"{f}: cannot read: {e}") from None
        h.update(f"{f}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def sync(store: Store, *, catalog: Sequence[str | Path] = (), oncall: str | Path | None = None,
         dry_run: bool = False, actor: str = "mpactl sync") -> dict[str, GrantDiff]:
    """Make the store's catalog and on-call grants match the files; return what changed.

    Everything is read and checked before anything is written. A source that is not
    given (no ``catalog`` paths, no ``oncall`` file) is left as it is. With ``dry_run``
    the store is only read and the returned diffs say what would change.

    A source whose files are byte for byte those of its last sync, with no grant changed
    by anyone since (same grants revision), is not parsed again: nothing can differ.
    """
    if not catalog and oncall is None:
        raise SyncError("nothing to sync: give catalog paths and/or an on-call file")
    inputs: dict[str, tuple[Sequence[str | Path], Callable[[], tuple[Grant, ...]]]] = {}
    if catalog:
        inputs[CATALOG_SOURCE] = (catalog, lambda: catalog_grants(catalog).grants)
    if oncall is not None:
        on = oncall
        inputs[ONCALL_SOURCE] = ([on], lambda: oncall_grants(on))
    digests = {src: input_digest(paths) for src, (paths, _) in inputs.items()}
    revision = store.grants_revision()
    wanted: dict[str, tuple[Grant, ...]] = {}
    unchanged: list[str] = []
    for src, (_, compute) in inputs.items():
        if not dry_run and store.sync_digest(src) == (digests[src], revision):
            unchanged.append(src)
        else:
            wanted[src] = compute()
    result = {src: GrantDiff() for src in unchanged}
    if dry_run:
        current = store.list_grants()
        return {src: plan_replace(current, src, grants) for src, grants in wanted.items()}
    for src, grants in wanted.items():
        result[src] = store.replace_grants(src, grants, actor=actor, digest=digests[src])
    return result
