"""Read .proto source trees with the real compiler and find each RPC's humans_who_can_rpc option.

``compile_protos`` runs protoc (from grpcio-tools) with ``--include_source_info`` so every RPC
comes back with its exact file, line and column, and with ``--include_imports`` so options
declared in imported files (our ``rpcauthz/v1/options.proto`` or a vendored copy of it) can
be read. Options are looked up by their full name (``rpcauthz.v1.humans_who_can_rpc``) in a
descriptor pool built from what protoc produced, never by importing generated code, so a
tree that vendors its own copy of the options file is read the same way.

Used by ``mpactl lint`` and ``mpactl migrate``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from policy import Mode

METHOD_OPTION = "rpcauthz.v1.humans_who_can_rpc"
SERVICE_OPTION = "rpcauthz.v1.default_humans_who_can_rpc"
OPTIONS_IMPORT = "rpcauthz/v1/options.proto"

# FileDescriptorProto / ServiceDescriptorProto / MethodDescriptorProto field numbers, the
# "path" components of SourceCodeInfo locations (see descriptor.proto).
_FILE_SERVICE, _SERVICE_METHOD, _METHOD_OPTIONS = 6, 2, 4
FILE_SYNTAX, FILE_PACKAGE, FILE_DEPENDENCY = 12, 2, 3

_PROTOC_DIAG = re.compile(r"^(?P<file>[^:\s][^:]*\.proto):(?P<line>\d+):(?P<col>\d+):\s*(?P<msg>.*)$")


class ProtoError(Exception):
    """A .proto file could not be read or compiled. ``str()`` is ready to print."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.line = line


Span = tuple[int, int, int, int]  # 0-based start line, start col, end line, end col (exclusive)


@dataclasses.dataclass(frozen=True)
class RpcInfo:
    """One RPC as declared in source, with its options and where it is written."""

    path: Path            # the file on disk, as the user named it
    proto_name: str       # the import path protoc knows it by
    service: str          # full name, e.g. google.longrunning.Operations
    method: str           # bare method name
    span: Span            # the whole ``rpc ...;`` or ``rpc ... { ... }`` statement
    method_mode: Mode | None
    service_mode: Mode | None
    method_option_span: Span | None  # the existing ``option (...humans_who_can_rpc) = X;``
    method_option_raw: str | None    # the enum value name written there (even if unknown)

    @property
    def line(self) -> int:
        """1-based line of the ``rpc`` keyword."""
        return self.span[0] + 1

    @property
    def column(self) -> int:
        """1-based column of the ``rpc`` keyword."""
        return self.span[1] + 1

    def resolved(self, default: Mode) -> tuple[Mode, str]:
        """The mode that applies and its source ("method", "service", "default")."""
        from policy import resolve_mode
        return resolve_mode(self.method_mode, self.service_mode, default)


@dataclasses.dataclass
class SourceFile:
    """A file we were asked about: where it is on disk and its import path."""

    path: Path
    proto_name: str
    descriptor: descriptor_pb2.FileDescriptorProto
    options_imported: bool  # does it import the file that declares the option?
    options_file: str | None  # that file's import path, when the option is known


@dataclasses.dataclass
class CompiledTree:
    """What protoc made of a set of files: their descriptors, and a pool to read options."""

    files: list[SourceFile]
    descriptor_set: descriptor_pb2.FileDescriptorSet
    includes: list[Path]
    _pool: descriptor_pool.DescriptorPool

    def rpcs(self) -> list[RpcInfo]:
        """Every RPC declared in the requested files, in file order."""
        out: list[RpcInfo] = []
        for f in self.files:
            out.extend(_file_rpcs(f, self._pool))
        return out

    def services(self) -> list[tuple[SourceFile, str]]:
        """(file, full service name) for every service declared in the requested files."""
        result = []
        for f in self.files:
            pkg = f.descriptor.package
            for s in f.descriptor.service:
                result.append((f, f"{pkg}.{s.name}" if pkg else s.name))
        return result


def well_known_include() -> Path:
    """grpcio-tools' copy of google/protobuf/*.proto."""
    import grpc_tools
    return Path(grpc_tools.__file__).parent / "_proto"


def options_include() -> Path | None:
    """The directory holding our ``rpcauthz/v1/options.proto`` (the repository's proto/)."""
    candidate = Path(__file__).resolve().parents[1] / "proto"
    return candidate if (candidate / OPTIONS_IMPORT).is_file() else None


def collect_proto_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories into a sorted, de-duplicated list of .proto files."""
    seen: dict[Path, Path] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(x for x in p.rglob("*.proto") if x.is_file())
        elif p.is_file() and p.suffix == ".proto":
            found = [p]
        elif p.is_file():  # parsed as a .proto it would only show a screen of syntax errors
            raise ProtoError(f"{p}: not a .proto file (give .proto files or directories holding them)", str(p))
        else:
            raise ProtoError(f"{p}: no such file or directory", str(p))
        for f in found:
            seen.setdefault(f.resolve(), f)
    return list(seen.values())


_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)\s*;", re.MULTILINE)


def guess_root(path: Path) -> Path:
    """The import root of a file given on its own: where its package's folders begin.

    ``.../src/google/longrunning/operations.proto`` with ``package google.longrunning;``
    gives ``.../src`` (so its imports of ``google/api/...`` resolve); a file whose folders
    do not follow its package gives its own folder.
    """
    parent = path.resolve().parent
    try:
        m = _PACKAGE.search(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        m = None
    if m:
        parts = m.group(1).split(".")
        for n in range(len(parts), 0, -1):
            if list(parent.parts[-n:]) == parts[:n]:
                return parent.parents[n - 1]
    return parent


def _proto_name(path: Path, includes: Sequence[Path]) -> tuple[str, Path] | None:
    real = path.resolve()
    for inc in includes:
        try:
            return real.relative_to(inc.resolve()).as_posix(), inc
        except ValueError:
            continue
    return None


def compile_protos(files: Sequence[Path], includes: Sequence[Path] = (),
                   overlay: dict[str, str] | None = None) -> CompiledTree:
    """Compile ``files`` with protoc and return their descriptors with source locations.

    ``includes`` are searched first (like ``protoc -I``); a file under none of them gets its
    own directory added. The well-known types and our options file come last, so a tree's
    vendored copies win. ``overlay`` maps an import path to replacement text (used by
    ``migrate`` to check an edit compiles before writing it). Raises ``ProtoError`` with
    protoc's own message (naming file and line) when anything does not compile.
    """
    if not files:
        raise ProtoError("no .proto files to read")
    roots = [Path(i) for i in includes]
    names: list[tuple[Path, str]] = []
    for f in files:
        found = _proto_name(f, roots)
        if found is None:
            roots.append(guess_root(f))
            found = _proto_name(f, roots)
        assert found is not None
        names.append((f, found[0]))
    tail = [well_known_include()]
    opt = options_include()
    if opt is not None:
        tail.append(opt)
    extra_args: list[str] = []

    with tempfile.TemporaryDirectory(prefix="mpactl-protoc-") as tmp:
        search = list(roots)
        if overlay:
            over = Path(tmp) / "overlay"
            for name, text in overlay.items():
                target = over / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            search.insert(0, over)
        if opt is None:
            # Installed without the repository's proto/ folder: hand protoc our options file
            # as a compiled descriptor; source files found on the include path still win.
            extra_args.append(f"--descriptor_set_in={_write_options_descriptor(Path(tmp))}")
        out = Path(tmp) / "set.pb"
        # Absolute -I paths and protoc run from the empty temporary directory: an input name
        # that also happens to be a path from the caller's directory (proto/x.proto under
        # --root .) would otherwise be read from disk and "shadowed" by the overlay.
        args = [*(f"-I{Path(p).resolve()}" for p in search + [t for t in tail if t not in search]),
                *extra_args,
                "--include_imports", "--include_source_info", f"--descriptor_set_out={out}",
                *(name for _, name in names)]
        # protoc reads arguments from @FILE, one a line: no command-line limit on big trees.
        argfile = Path(tmp) / "args.txt"
        argfile.write_text("\n".join(args) + "\n", encoding="utf-8")
        argv = [sys.executable, "-m", "grpc_tools.protoc", f"@{argfile}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise _protoc_error(proc.stderr or proc.stdout, roots, names)
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())

    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    by_name = {fd.name: fd for fd in fds.file}
    options_file = _extension_file(pool, METHOD_OPTION)
    sources = []
    for path, name in names:
        fd = by_name[name]
        sources.append(SourceFile(path=path, proto_name=name, descriptor=fd,
                                  options_imported=options_file is not None and (
                                      options_file in fd.dependency),
                                  options_file=options_file))
    return CompiledTree(files=sources, descriptor_set=fds, includes=roots, _pool=pool)


def _write_options_descriptor(directory: Path) -> Path:
    """rpcauthz/v1/options.proto (and descriptor.proto) as a FileDescriptorSet file."""
    from google.protobuf import descriptor_pb2 as dpb

    from rpcauthz.v1 import options_pb2

    fds = dpb.FileDescriptorSet()
    dpb.DESCRIPTOR.CopyToProto(fds.file.add())
    options_pb2.DESCRIPTOR.CopyToProto(fds.file.add())
    path = directory / "rpcauthz-options.pb"
    path.write_bytes(fds.SerializeToString())
    return path


def _extension_file(pool: descriptor_pool.DescriptorPool, full_name: str) -> str | None:
    try:
        # FieldDescriptor.file exists at run time; types-protobuf does not declare it.
        return pool.FindExtensionByName(full_name).file.name  # type: ignore[attr-defined]
    except KeyError:
        return None


def _protoc_error(stderr: str, roots: Sequence[Path], names: Sequence[tuple[Path, str]]) -> ProtoError:
    """protoc's message, with import paths turned back into the paths the user gave."""
    disk = {name: str(path) for path, name in names}
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    first_file = first_line = None
    shown = []
    for ln in lines:
        m = _PROTOC_DIAG.match(ln)
        if m:
            name = m["file"]
            where = disk.get(name) or _find_on_disk(name, roots) or name
            shown.append(f"{where}:{m['line']}:{m['col']}: error: {m['msg']}")
            if first_file is None:
                first_file, first_line = where, int(m["line"])
        else:
            shown.append(ln)
    if not shown:
        shown = ["protoc failed without a message"]
    return ProtoError("\n".join(shown), first_file, first_line)


def _find_on_disk(name: str, roots: Sequence[Path]) -> str | None:
    for r in roots:
        if (r / name).is_file():
            return str(r / name)
    return None


def _locations(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], Span]:
    spans: dict[tuple[int, ...], Span] = {}
    for loc in fd.source_code_info.location:
        s = list(loc.span)
        span = (s[0], s[1], s[0], s[2]) if len(s) == 3 else (s[0], s[1], s[2], s[3])
        spans.setdefault(tuple(loc.path), span)
    return spans


def file_spans(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], Span]:
    """SourceCodeInfo of ``fd`` as {path: span}; spans are 0-based, end exclusive."""
    return _locations(fd)


def offset_of(text: str, line_starts: Sequence[int], line: int, column: int) -> int:
    """The index into ``text`` of protoc's 0-based (line, column).

    protoc counts columns in bytes and expands tabs to the next multiple of 8, so a
    column is not a character index on lines with tabs or non-ASCII text.
    """
    i = line_starts[line] if line < len(line_starts) else len(text)
    col = 0
    while col < column and i < len(text) and text[i] != "\n":
        ch = text[i]
        col += 8 - col % 8 if ch == "\t" else len(ch.encode("utf-8"))
        i += 1
    return i


def _read_option(pool: descriptor_pool.DescriptorPool, options_msg, options_type: str,
                 ext_name: str) -> tuple[Mode | None, str | None]:
    """The option's value as (Mode or None, the enum name as written)."""
    try:
        ext = pool.FindExtensionByName(ext_name)
    except KeyError:
        return None, None
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(options_type))
    opts = cls.FromString(options_msg.SerializeToString())
    # types-protobuf accepts only generated extension handles; a FieldDescriptor found in a
    # pool is one at run time.
    if not opts.HasExtension(ext):  # type: ignore[arg-type]
        return None, None
    number: int = opts.Extensions[ext]  # type: ignore[index]
    value = ext.enum_type.values_by_number.get(number) if ext.enum_type else None
    raw = value.name if value is not None else str(number)
    try:
        mode = Mode.parse(raw)
    except ValueError:
        return None, raw  # a value we do not know never widens access: treat as unset
    return (None if mode is Mode.UNSPECIFIED else mode), raw


def _file_rpcs(f: SourceFile, pool: descriptor_pool.DescriptorPool) -> list[RpcInfo]:
    fd = f.descriptor
    spans = _locations(fd)
    ext_num = None
    try:
        ext_num = pool.FindExtensionByName(METHOD_OPTION).number
    except KeyError:
        pass
    out = []
    for si, svc in enumerate(fd.service):
        full = f"{fd.package}.{svc.name}" if fd.package else svc.name
        svc_mode, _ = _read_option(pool, svc.options, "google.protobuf.ServiceOptions", SERVICE_OPTION)
        for mi, m in enumerate(svc.method):
            mode, raw = _read_option(pool, m.options, "google.protobuf.MethodOptions", METHOD_OPTION)
            base = (_FILE_SERVICE, si, _SERVICE_METHOD, mi)
            opt_span = spans.get(base + (_METHOD_OPTIONS, ext_num)) if ext_num else None
            out.append(RpcInfo(path=f.path, proto_name=f.proto_name, service=full, method=m.name,
                               span=spans.get(base, (0, 0, 0, 0)), method_mode=mode,
                               service_mode=svc_mode, method_option_span=opt_span,
                               method_option_raw=raw))
    return out
