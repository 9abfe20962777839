"""``mpactl reflect``: show what the gateway learns about a service through reflection.

    mpactl reflect rpcauthz.demo.v1.Ledger --endpoint 127.0.0.1:50062
    python -m reflection_cache.cli rpcauthz.demo.v1.Ledger --endpoint 127.0.0.1:50062 --json

Prints each method's declared option, the mode that applies and where it comes from
(method / service / default). Exit status (README.md, "Exit codes") 0 on success; otherwise
``error: <code>: <message>`` on stderr when the options cannot be learned (the gateway would
refuse those calls): 4 when the reflection endpoint is unavailable, 2 for bad options or a
service or method it does not know, 1 when the service's answer is unusable (malformed).
"""
from __future__ import annotations

import asyncio

import typer

from policy import Mode
from reflection_cache.client import ChannelPool, ReflectionClient, tls_credentials
from reflection_cache.endpoints import EndpointResolver
from reflection_cache.types import ReflectionError, ReflectionUnavailable, ServiceModes, UnknownMethod, UnknownService
from rpcauthz.console import ExitCode, JsonOption, fail, print_json


def _name(mode: Mode | None) -> str:
    return "-" if mode is None else mode.name


def describe(modes: ServiceModes, default: Mode) -> list[dict[str, str]]:
    """One row per method: declared option, the mode that applies, and its source."""
    rows = []
    for method in modes.methods:
        applies, source = modes.mode_for(method, default)
        rows.append({"method": method, "declared": _name(modes.methods[method]),
                     "applies": applies.name, "from": source})
    return rows


def reflect(
    service: str = typer.Argument(..., help="Full gRPC service name, e.g. rpcauthz.demo.v1.Ledger."),
    endpoint: str | None = typer.Option(None, help="host:port of the service's reflection."),
    template: str | None = typer.Option(
        None, help="Endpoint template instead of --endpoint, e.g. '{name_lower}.internal:50051'."),
    default_mode: str = typer.Option("BREAK_GLASS_ONLY", help="Mode for methods with no option at all."),
    deadline: float = typer.Option(2.0, help="Seconds to wait for reflection."),
    as_json: bool = JsonOption("Print JSON instead of a table: {service, endpoint, reflection, service_default, "
                               "methods: [{method, declared, applies, from}]}."),
    ca_file: str | None = typer.Option(None, help="Dial with TLS, trusting this CA (PEM)."),
    cert_file: str | None = typer.Option(None, help="Client certificate for mutual TLS (PEM)."),
    key_file: str | None = typer.Option(None, help="Client key for mutual TLS (PEM)."),
) -> None:
    """Show each method's humans_who_can_rpc option as the gateway reads it through reflection."""
    try:
        default = Mode.parse(default_mode)
        resolver = EndpointResolver(template=template, default=endpoint)
        tls = any((ca_file, cert_file, key_file))
        credentials = tls_credentials(ca_file, cert_file, key_file) if tls else None
    except ValueError as e:
        fail(str(e), ExitCode.USAGE)
    if default is Mode.UNSPECIFIED:
        fail("--default-mode cannot be UNSPECIFIED", ExitCode.USAGE)

    async def fetch() -> tuple[str, ServiceModes, str]:
        client = ReflectionClient(deadline=deadline, channels=ChannelPool(credentials=credentials))
        try:
            where = resolver.resolve(service)
            modes = await client.fetch(service, where)
            return where, modes, client.protocol_of.get(where, "?")
        finally:
            await client.close()

    try:
        where, modes, protocol = asyncio.run(fetch())
    except ReflectionError as e:
        fail(f"{e.code}: {e}", _exit_code(e))
    rows = describe(modes, default)
    if as_json:
        print_json({"service": service, "endpoint": where, "reflection": protocol,
                    "service_default": _name(modes.service_default), "methods": rows})
        return
    typer.echo(f"{service} at {where} (reflection {protocol})")
    typer.echo(f"service default: {_name(modes.service_default)}; configured default: {default.name}")
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
              for h, k in (("METHOD", "method"), ("DECLARED", "declared"), ("APPLIES", "applies"))]
    typer.echo(f"{'METHOD':<{widths[0]}}  {'DECLARED':<{widths[1]}}  {'APPLIES':<{widths[2]}}  FROM")
    for r in rows:
        typer.echo(f"{r['method']:<{widths[0]}}  {r['declared']:<{widths[1]}}  "
                   f"{r['applies']:<{widths[2]}}  {r['from']}")


def _exit_code(error: ReflectionError) -> ExitCode:
    """README's exit code for a reflection failure: unreachable, bad input, or an unusable answer."""
    if isinstance(error, ReflectionUnavailable):
        return ExitCode.UNREACHABLE
    if isinstance(error, UnknownService | UnknownMethod):
        return ExitCode.USAGE
    return ExitCode.FAILURE


def register(app: typer.Typer) -> None:
    """Add ``reflect`` to mpactl."""
    app.command("reflect")(reflect)


def main() -> None:
    typer.run(reflect)


if __name__ == "__main__":
    main()
