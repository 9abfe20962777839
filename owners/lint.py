"""``mpactl lint``: every RPC must say who may call it by hand.

An RPC passes when it has its own ``humans_who_can_rpc`` option, or its service has a
``default_humans_who_can_rpc``. Anything else is a finding: at the gateway such an RPC falls
to the configured default (``BREAK_GLASS_ONLY`` out of the box), which is safe but almost
never what the owners meant. Findings print compiler-style (``file:line:col: message``) so
editors and CI annotate them; ``--format json`` prints the same as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from policy import DEFAULT_MODE, Mode
from rpcauthz.console import ExitCode

from .proto_source import ProtoError, collect_proto_files, compile_protos

#: Exit codes: CI keys on them (README.md's table: ok, failure = findings, usage = cannot parse,
#: unreachable = the --reflect endpoint cannot be reached).
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_UNREACHABLE = (ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE,
                                                        ExitCode.UNREACHABLE)


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

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_UNREACHABLE if self.unreachable else EXIT_ERROR
        return EXIT_FINDINGS if self.findings else EXIT_OK

    def to_json(self) -> dict:
        return {"files": self.files, "rpcs": self.rpcs, "error": self.error,
                "findings": [dataclasses.asdict(f) for f in self.findings]}

    def render(self, fmt: str = "text") -> str:
        """The report as ``text`` (compiler style, one finding a line) or ``json``."""
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2)
        if self.error:
            return self.error
        lines = [str(f) for f in self.findings]
        where = f" in {self.files} files" if self.files else ""
        lines.append(f"{len(self.findings)} of {self.rpcs} RPCs{where} "
                     "have no humans_who_can_rpc option" if self.findings
                     else f"ok: all {self.rpcs} RPCs{where} declare humans_who_can_rpc")
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
    findings = []
    rpcs = tree.rpcs()
    for r in rpcs:
        if r.method_mode is None and r.service_mode is None:
            code, msg = _missing_message(r.service, r.method, r.method_option_raw, default)
            findings.append(Finding(str(r.path), r.line, r.column, r.service, r.method, msg, code))
    return LintReport(findings, files=len(files), rpcs=len(rpcs))


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
