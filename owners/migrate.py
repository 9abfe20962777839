"""``mpactl migrate SERVICE``: walk a service's RPCs and write humans_who_can_rpc into its .proto.

The steps, each a function so tests and other tools can reuse them:

1. ``find_service`` finds the .proto that declares the service under a root directory and
   compiles it with protoc (so positions are exact and imports resolve).
2. ``plan`` pairs each RPC with its current mode, recent usage and a suggested mode
   (``suggest``, heuristic documented there and in docs/owners.md).
3. The CLI asks for a mode per RPC (or takes ``--set Method=MODE``).
4. ``apply_modes`` edits the source text in place: it inserts or updates
   ``option (rpcauthz.v1.humans_who_can_rpc) = MODE;`` in each RPC's body (turning
   ``rpc X(A) returns (B);`` into a ``{ ... }`` body where needed) and adds the import, and
   touches nothing else, so formatting and comments survive.
5. ``write_checked`` recompiles the edited text, checks every mode reads back as chosen, and
   only then replaces the file atomically (temporary file + rename).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from policy import DEFAULT_MODE, Mode

from .proto_source import (
    FILE_DEPENDENCY,
    FILE_PACKAGE,
    FILE_SYNTAX,
    OPTIONS_IMPORT,
    CompiledTree,
    ProtoError,
    RpcInfo,
    SourceFile,
    compile_protos,
    file_spans,
    guess_root,
    offset_of,
)
from .usage import MethodUsage

OPTION_NAME = "(rpcauthz.v1.humans_who_can_rpc)"

#: How many distinct engineers make a read-like RPC "widely used".
WIDE_USE = 3

# Words are matched against the RPC name split at CamelCase/underscores.
_DESTRUCTIVE = {"erase", "purge", "wipe", "destroy", "shred", "forget", "obliterate", "nuke",
                "redact", "anonymize", "anonymise", "truncate", "drop"}
_READ_VERBS = {"get", "list", "read", "search", "query", "lookup", "find", "describe", "fetch",
               "watch", "wait", "count", "check", "ping", "health", "stat", "show", "view",
               "batchget", "peek", "resolve", "explain", "export", "validate", "verify"}
_WRITE_VERBS = {"create", "update", "delete", "remove", "set", "put", "patch", "write", "insert",
                "add", "cancel", "close", "open", "move", "transfer", "refund", "pay", "send",
                "approve", "reject", "grant", "revoke", "enable", "disable", "reset", "rotate",
                "import", "upsert", "replace", "restore", "undelete", "commit", "rollback",
                "migrate", "trigger", "run", "start", "stop", "restart", "freeze", "unfreeze",
                "block", "unblock", "suspend", "resume", "mark", "assign", "unassign"}


class MigrateError(Exception):
    """The migration cannot proceed; the message names the file and line when there is one."""


def split_words(name: str) -> list[str]:
    """``BatchGetAccounts`` -> ["batch", "get", "accounts"]."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|_", " ", name)
    return [w.lower() for w in spaced.split() if w]


def suggest(method: str, usage: MethodUsage | None = None) -> tuple[Mode, str]:
    """Suggest a mode for ``method`` from its name and recent usage, with the reason.

    - Any destructive word (erase, purge, wipe, destroy, ...) -> BREAK_GLASS_ONLY.
    - A write-like verb (create, update, delete, cancel, transfer, ...) -> CONTRIBUTORS_WITH_APPROVAL.
    - A read-like verb (get, list, read, search, watch, ...) -> ENGINEERS_WITHOUT_APPROVAL when
      at least ``WIDE_USE`` different engineers called it recently, else
      CONTRIBUTORS_WITHOUT_APPROVAL.
    - Anything else -> CONTRIBUTORS_WITH_APPROVAL (unknown effects: ask a peer).
    A suggestion is only a default for the prompt; owners decide.
    """
    words = split_words(method)
    if _DESTRUCTIVE.intersection(words):
        word = next(w for w in words if w in _DESTRUCTIVE)
        return Mode.BREAK_GLASS_ONLY, f"'{word}' sounds irreversible"
    verbs = [w for w in words if w != "batch"]
    verb = verbs[0] if verbs else ""
    if verb in _WRITE_VERBS:
        return Mode.CONTRIBUTORS_WITH_APPROVAL, f"'{verb}' changes state"
    if verb in _READ_VERBS:
        if usage is None:
            return Mode.CONTRIBUTORS_WITHOUT_APPROVAL, f"'{verb}' reads; no usage data"
        n = usage.engineers
        if n >= WIDE_USE:
            return Mode.ENGINEERS_WITHOUT_APPROVAL, f"'{verb}' reads, and {n} engineers used it"
        return (Mode.CONTRIBUTORS_WITHOUT_APPROVAL,
                f"'{verb}' reads, used by {n} engineer{'s' if n != 1 else ''} (< {WIDE_USE})")
    return Mode.CONTRIBUTORS_WITH_APPROVAL, "effect not clear from the name"


@dataclasses.dataclass
class Found:
    """A service located in a source tree."""

    service: str
    tree: CompiledTree
    file: SourceFile
    rpcs: list[RpcInfo]


def find_service(service: str, root: Path, includes: Sequence[Path] = ()) -> Found:
    """Locate and compile the .proto that declares ``service`` (full or bare name) under ``root``."""
    if not root.is_dir():
        raise MigrateError(f"{root}: not a directory")
    bare = service.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*service\s+{re.escape(bare)}\s*\{{", re.MULTILINE)
    candidates = []
    for p in sorted(root.rglob("*.proto")):
        try:
            if pattern.search(p.read_text(encoding="utf-8", errors="replace")):
                candidates.append(p)
        except OSError as e:
            raise MigrateError(f"{p}: cannot read: {e}") from None
    if not candidates:
        raise MigrateError(f"unknown service {service!r}: no .proto under {root} declares "
                           f"`service {bare}`")
    # Each file's own import root (where its package's folders begin, e.g. proto/ for
    # proto/rpcauthz/demo/v1/ledger.proto) comes before --root, so `--root .` from a
    # checkout's top finds the names its imports use.
    own_roots = []
    for c in candidates:
        guessed = guess_root(c)
        if guessed != c.resolve().parent and guessed not in own_roots:
            own_roots.append(guessed)
    try:
        tree = compile_protos(candidates, [*includes, *own_roots, root])
    except ProtoError as e:
        raise MigrateError(str(e)) from None
    matches = [(f, name) for f, name in tree.services()
               if name == service or ("." not in service and name.rsplit(".", 1)[-1] == service)]
    if not matches:
        found = ", ".join(name for _, name in tree.services()) or "none"
        raise MigrateError(f"unknown service {service!r} under {root} (services there named "
                           f"{bare}: {found})")
    if len(matches) > 1:
        where = "; ".join(f"{name} in {f.path}" for f, name in matches)
        raise MigrateError(f"service name {service!r} is ambiguous: {where}; give the full name")
    f, full = matches[0]
    rpcs = [r for r in tree.rpcs() if r.service == full]
    return Found(full, tree, f, rpcs)


@dataclasses.dataclass
class Step:
    """One RPC in the walk: where it stands and what we suggest."""

    rpc: RpcInfo
    current: Mode
    source: str  # "method", "service", "default"
    usage: MethodUsage
    suggestion: Mode
    reason: str

    @property
    def default_choice(self) -> Mode | None:
        """What pressing Enter picks: keep an explicit method option, else the suggestion."""
        return None if self.source == "method" else self.suggestion


def plan(found: Found, usage: Mapping[str, MethodUsage] | None = None,
         default: Mode = DEFAULT_MODE) -> list[Step]:
    """One ``Step`` per RPC of the service, in file order."""
    steps = []
    for r in found.rpcs:
        known = None if usage is None else usage.get(r.method) or MethodUsage(r.method)
        u = known or MethodUsage(r.method)
        mode, source = r.resolved(default)
        sug, why = suggest(r.method, known)
        steps.append(Step(r, mode, source, u, sug, why))
    return steps


def describe_current(step: Step) -> str:
    """``CONTRIBUTORS_WITH_APPROVAL (method option)``, etc."""
    where = {"method": "method option", "service": "service default",
             "default": "none set: gateway default"}[step.source]
    return f"{step.current.name} ({where})"


# --- editing ------------------------------------------------------------------------------

def _line_offsets(text: str) -> list[int]:
    offsets = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            offsets.append(i + 1)
    return offsets


def _indent_of(text: str, offset: int) -> str:
    start = text.rfind("\n", 0, offset) + 1
    m = re.match(r"[ \t]*", text[start:])
    return m.group(0) if m else ""


def _option_line(mode: Mode) -> str:
    return f"option {OPTION_NAME} = {mode.name};"


def _edit_rpc(text: str, offs: list[int], rpc: RpcInfo, mode: Mode) -> tuple[int, int, str]:
    """(start, end, replacement) that gives ``rpc`` the option ``mode``."""
    if rpc.method_option_span is not None:
        sl, sc, el, ec = rpc.method_option_span
        start, end = offset_of(text, offs, sl, sc), offset_of(text, offs, el, ec)
        old = text[start:end]
        new, n = re.subn(r"(=\s*)[A-Za-z_][\w.]*(\s*;?\s*)$", rf"\g<1>{mode.name}\g<2>", old)
        if n != 1:
            new = _option_line(mode)
        return start, end, new
    sl, sc, el, ec = rpc.span
    start, end = offset_of(text, offs, sl, sc), offset_of(text, offs, el, ec)
    stmt = text[start:end]
    indent = _indent_of(text, start)
    unit = indent or "  "
    if stmt.rstrip().endswith(";"):  # rpc X(A) returns (B);
        semi = start + stmt.rstrip().rfind(";")
        return semi, end, f" {{\n{indent}{unit}{_option_line(mode)}\n{indent}}}"
    if not stmt.rstrip().endswith("}"):
        raise MigrateError(f"{rpc.path}:{rpc.line}: cannot see where rpc {rpc.method} ends")
    brace = start + stmt.rstrip().rfind("}")
    line_start = text.rfind("\n", 0, brace) + 1
    if text[line_start:brace].strip() == "":  # closing brace on its own line
        brace_indent = text[line_start:brace]
        return line_start, line_start, f"{brace_indent}{unit}{_option_line(mode)}\n"
    # Body closed on the same line, e.g. `rpc X(A) returns (B) {}`: open it up.
    body_end = brace
    while body_end > start and text[body_end - 1] in " \t":
        body_end -= 1
    return body_end, brace + 1, f"\n{indent}{unit}{_option_line(mode)}\n{indent}}}"


def _import_edit(text: str, offs: list[int], f: SourceFile, import_path: str) -> tuple[int, int, str]:
    spans = file_spans(f.descriptor)
    deps = [spans[k] for k in spans if len(k) == 2 and k[0] == FILE_DEPENDENCY]
    line = f'import "{import_path}";\n'
    if deps:
        last = max(deps)
        at = offs[last[2] + 1] if last[2] + 1 < len(offs) else len(text)
        return at, at, line
    for key in ((FILE_PACKAGE,), (FILE_SYNTAX,)):
        if key in spans:
            el = spans[key][2]
            at = offs[el + 1] if el + 1 < len(offs) else len(text)
            return at, at, "\n" + line
    return 0, 0, line + "\n"


def apply_modes(text: str, file: SourceFile, choices: Mapping[str, Mode],
                rpcs: Sequence[RpcInfo]) -> str:
    """Return ``text`` with each RPC named in ``choices`` set to its mode; nothing else changes.

    ``rpcs`` must be the RPCs compiled from exactly this ``text`` (their spans index it).
    """
    offs = _line_offsets(text)
    edits = []
    for r in rpcs:
        if r.method in choices and r.method_mode is not choices[r.method]:
            edits.append(_edit_rpc(text, offs, r, choices[r.method]))
    if edits and not file.options_imported:
        edits.append(_import_edit(text, offs, file, file.options_file or OPTIONS_IMPORT))
    newline = "\r\n" if "\r\n" in text else "\n"  # keep the file's line endings
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:start] + new.replace("\n", newline) + text[end:]
    return text


def unified_diff(path: Path, old: str, new: str, root: Path | None = None) -> str:
    """A ``git diff``-style unified diff of one file (named relative to ``root`` if given)."""
    name = path.as_posix()
    if root is not None:
        try:
            name = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    name = name.lstrip("/")
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def check_edit(found: Found, new_text: str, choices: Mapping[str, Mode]) -> None:
    """Compile ``new_text`` in place of the service's file and check every mode reads back."""
    try:
        tree = compile_protos([found.file.path], found.tree.includes,
                              overlay={found.file.proto_name: new_text})
    except ProtoError as e:
        raise MigrateError(f"the edited file would not compile, nothing written:\n{e}") from None
    got = {r.method: r for r in tree.rpcs() if r.service == found.service}
    for method, mode in choices.items():
        r = got.get(method)
        if r is None or r.method_mode is not mode:
            raise MigrateError(f"{found.file.path}: after editing, {method} reads as "
                               f"{r.method_mode if r else 'missing'} instead of {mode.name}; "
                               "nothing written")
    before = {r.method: r.method_mode for r in found.rpcs}
    for method, r in got.items():
        if method not in choices and r.method_mode is not before.get(method):
            raise MigrateError(f"{found.file.path}: the edit changed {method} too; nothing written")


def read_source(path: Path) -> str:
    """The file's text exactly, line endings included."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_set(values: Sequence[str], found: Found) -> dict[str, Mode]:
    """``["GetOperation=ENGINEERS_WITHOUT_APPROVAL", ...]`` -> {method: Mode}, checked."""
    methods = {r.method: r for r in found.rpcs}
    out: dict[str, Mode] = {}
    for v in values:
        if "=" not in v:
            raise MigrateError(f"--set {v!r}: expected Method=MODE")
        method, _, mode_text = v.partition("=")
        method = method.strip()
        if method not in methods:
            raise MigrateError(f"{found.file.path}: service {found.service} has no rpc "
                               f"{method!r} (it has {', '.join(methods) or 'none'})")
        try:
            mode = Mode.parse(mode_text)
        except ValueError as e:
            r = methods[method]
            raise MigrateError(f"{r.path}:{r.line}: --set {method}: {e}") from None
        if mode is Mode.UNSPECIFIED:
            r = methods[method]
            raise MigrateError(f"{r.path}:{r.line}: --set {method}: UNSPECIFIED is not a mode "
                               "anyone can rely on; pick one of the five")
        out[method] = mode
    return out


def finish(found: Found, choices: Mapping[str, Mode], *, write: bool = True) -> tuple[str, str]:
    """Edit, check and (if ``write``) save the service's file; returns (old_text, new_text)."""
    path = found.file.path
    old = read_source(path)
    changed = {m: mode for m, mode in choices.items()
               if next(r for r in found.rpcs if r.method == m).method_mode is not mode}
    if not changed:
        return old, old
    new = apply_modes(old, found.file, changed, found.rpcs)
    check_edit(found, new, choices)
    if write:
        write_atomically(path, new)
    return old, new


__all__ = ["Found", "MigrateError", "Step", "apply_modes", "check_edit", "describe_current",
           "find_service", "finish", "parse_set", "plan", "suggest", "unified_diff",
           "read_source", "write_atomically"]
