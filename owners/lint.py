"""``mpactl lint``: every RPC must say who may call it by hand.

An RPC passes when it has its own ``humans_who_can_rpc`` option, or its service has a
``default_humans_who_can_rpc``. Anything else is a finding: at the gateway such an RPC falls
to the configured default (``BREAK_GLASS_ONLY`` out of the box), which is safe but almost
never what the owners meant. Findings print compiler-style (``file:line:col: message``) so
editors and CI annotate them; ``--format json`` prints the same as JSON.

A reviewed finding is accepted with a comment right above the ``rpc`` (or on its line), or
right above its ``service`` for every RPC of it::

    // mpactl-lint: allow missing-option: served over TLS passthrough, never via ext_authz

The reason is required (at least ``MIN_REASON`` characters): a suppression without one is
itself a finding (``suppression-without-reason``). Suppressed findings are not failures; they
are listed with their reasons (``suppressed`` in ``--format json``) so reviews can see them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from policy import DEFAULT_MODE, Mode
from rpcauthz.console import ExitCode

from .proto_source import ProtoError, collect_proto_files, compile_protos

#: Exit codes: CI keys on them (README.md's table: ok, failure = findings, usage = cannot parse,
#: unreachable = the --reflect endpoint cannot be reached).
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_UNREACHABLE = (ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE,
                                                        ExitCode.UNREACHABLE)
#: Shortest accepted reason in a suppression comment.
MIN_REASON = 10
_ALLOW = re.compile(r"//\s*mpactl-lint:\s*allow\s+([a-z][a-z-]*)\s*(?::\s*(.*?))?\s*$")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One RPC that does not declare who may call it."""

    file: str
    line: int
    column: int
    service: str
    method: str
    message: str
    code: str = "missing-option"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: error: {self.message} [{self.code}]"


@dataclasses.dataclass
class LintReport:
    """What a lint run found."""

    findings: list[Finding]
    files: int = 0
    rpcs: int = 0
    error: str | None = None
    #: The error is that the --reflect endpoint could not be reached (not bad input).
    unreachable: bool = False
    #: (finding, reason) for reviewed findings accepted with a suppression comment.
    suppressed: list[tuple[Finding, str]] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_UNREACHABLE if self.unreachable else EXIT_ERROR
        return EXIT_FINDINGS if self.findings else EXIT_OK

    def to_json(self) -> dict:
        return {"files": self.files, "rpcs": self.rpcs, "error": self.error,
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "suppressed": [{**dataclasses.asdict(f), "reason": why}
                               for f, why in self.suppressed]}

    def render(self, fmt: str = "text") -> str:
        """The report as ``text`` (compiler style, one finding a line) or ``json``."""
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2)
        if self.error:
            return self.error
        lines = [str(f) for f in self.findings]
        lines += [f"{f.file}:{f.line}:{f.column}: note: {f.code} in {f.service}.{f.method} "
                  f"suppressed: {why}" for f, why in self.suppressed]
        where = f" in {self.files} files" if self.files else ""
        accepted = (f"; {len(self.suppressed)} findings accepted with a reason"
                    if self.suppressed else "")
        if self.findings:
            lines.append(f"{len(self.findings)} of {self.rpcs} RPCs{where} have no "
                         f"humans_who_can_rpc option{accepted}")
        elif self.suppressed:
            lines.append(f"ok: {self.rpcs} RPCs{where}: {self.rpcs - len(self.suppressed)} declare "
                         f"humans_who_can_rpc{accepted}")
        else:
            lines.append(f"ok: all {self.rpcs} RPCs{where} declare humans_who_can_rpc")
        return "\n".join(lines)


def _missing_message(service: str, method: str, raw: str | None, default: Mode) -> tuple[str, str]:
    if raw is not None:
        return ("bad-value",
                f"rpc {service}.{method} sets humans_who_can_rpc to {raw}, which is not a mode; "
                f"set one of {', '.join(m.name for m in Mode if m is not Mode.UNSPECIFIED)} "
                f"(until then the gateway default {default.name} applies)")
    return ("missing-option",
            f"rpc {service}.{method} has no humans_who_can_rpc option and service {service} "
            f"sets no default_humans_who_can_rpc; the gateway default {default.name} applies "
            f"(fix: add `option (rpcauthz.v1.humans_who_can_rpc) = MODE;` or run "
            f"`mpactl migrate {service}`)")


def lint_paths(paths: Sequence[str | os.PathLike], includes: Sequence[str | os.PathLike] = (),
               default: Mode = DEFAULT_MODE) -> LintReport:
    """Lint .proto files and directories. Directories are also used as include roots."""
    try:
        files = collect_proto_files(paths)
        if not files:
            return LintReport([], error=f"no .proto files under {', '.join(map(str, paths))}")
        roots = [Path(i) for i in includes] + [Path(p) for p in paths if Path(p).is_dir()]
        tree = compile_protos(files, roots)
    except ProtoError as e:
        return LintReport([], error=str(e))
    findings: list[Finding] = []
    suppressed: list[tuple[Finding, str]] = []
    rpcs = tree.rpcs()
    sources: dict[Path, list[str]] = {}
    for r in rpcs:
        if r.method_mode is None and r.service_mode is None:
            code, msg = _missing_message(r.service, r.method, r.method_option_raw, default)
            finding = Finding(str(r.path), r.line, r.column, r.service, r.method, msg, code)
            if r.path not in sources:
                sources[r.path] = r.path.read_text(encoding="utf-8", errors="replace").splitlines()
            lines = sources[r.path]
            allow = _allowance(lines, r.line, code) or _allowance(
                lines, _service_line(lines, r.service), code)
            if allow is None:
                findings.append(finding)
            elif len(allow[1]) < MIN_REASON:
                findings.append(Finding(
                    str(r.path), allow[0], 1, r.service, r.method,
                    f"suppression of {code} for {r.service}.{r.method} gives no reason: write "
                    f"`// mpactl-lint: allow {code}: WHY` (at least {MIN_REASON} characters)",
                    "suppression-without-reason"))
            else:
                suppressed.append((finding, allow[1]))
    return LintReport(findings, files=len(files), rpcs=len(rpcs), suppressed=suppressed)


def _service_line(lines: Sequence[str], service: str) -> int:
    """1-based line of ``service Name {`` (0 when not found)."""
    pattern = re.compile(rf"^\s*service\s+{re.escape(service.rsplit('.', 1)[-1])}\b")
    return next((i + 1 for i, text in enumerate(lines) if pattern.match(text)), 0)


def _allowance(lines: Sequence[str], line: int, code: str) -> tuple[int, str] | None:
    """(line, reason) of a ``// mpactl-lint: allow CODE`` comment on ``line`` (1-based) or in
    the comment lines right above it; None when there is none."""
    if line < 1:
        return None
    candidates = [line]
    i = line - 1
    while i >= 1 and lines[i - 1].strip().startswith("//"):
        candidates.append(i)
        i -= 1
    for n in candidates:
        text = lines[n - 1]
        at = text.find("//")
        m = _ALLOW.search(text[at:]) if at >= 0 else None
        if m and m.group(1) == code:
            return n, (m.group(2) or "").strip()
    return None


def lint_service_modes(modes, where: str, default: Mode = DEFAULT_MODE) -> LintReport:
    """Lint what a live service reported through reflection (a ``ServiceModes``).

    There are no source positions at runtime, so findings name ``where`` (HOST:PORT) and
    line/column 0.
    """
    findings = []
    if modes.service_default is None:
        for method, mode in sorted(modes.methods.items()):
            if mode is None:
                _, msg = _missing_message(modes.service, method, None, default)
                findings.append(Finding(where, 0, 0, modes.service, method, msg))
    return LintReport(findings, files=0, rpcs=len(modes.methods))


def list_services(target: str, timeout: float = 5.0) -> list[str]:
    """Service names a live server lists through reflection (v1alpha ListServices).

    Reflection's own services and the health service are left out: they are infrastructure.
    """
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        # types-grpcio-reflection types this attribute as binascii.Incomplete (an exception class).
        for response in stub.ServerReflectionInfo(iter([request]), timeout=timeout):  # type: ignore[operator]
            if response.HasField("error_response"):
                raise RuntimeError(response.error_response.error_message)
            names = [s.name for s in response.list_services_response.service]
            return [n for n in names if not n.startswith(("grpc.reflection.", "grpc.health."))]
    return []


def lint_reflection(target: str, services: Sequence[str] = (), default: Mode = DEFAULT_MODE,
                    deadline: float = 5.0) -> LintReport:
    """Lint what a live service declares, asked through reflection like the gateway asks."""
    import asyncio

    import grpc

    from reflection_cache.client import ReflectionClient
    from reflection_cache.types import ReflectionError, ReflectionUnavailable

    try:
        names = list(services) or list_services(target, deadline)
    except (grpc.RpcError, RuntimeError) as e:
        detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
        down = isinstance(e, grpc.RpcError) and e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                              grpc.StatusCode.DEADLINE_EXCEEDED)
        return LintReport([], error=f"{target}: cannot list services through reflection: {detail}",
                          unreachable=down)
    if not names:
        return LintReport([], error=f"{target}: reflection lists no services")

    async def fetch_all():
        client = ReflectionClient(deadline=deadline)
        try:
            return [await client.fetch(n, target) for n in names]
        finally:
            await client.close()

    try:
        all_modes = asyncio.run(fetch_all())
    except ReflectionError as e:
        return LintReport([], error=f"{target}: {e}", unreachable=isinstance(e, ReflectionUnavailable))
    report = LintReport([], files=0)
    for modes in all_modes:
        part = lint_service_modes(modes, target, default)
        report.findings += part.findings
        report.rpcs += part.rpcs
    return report
