"""``mpactl reflect``: show what the gateway learns about a service through reflection.

    mpactl reflect rpcauthz.demo.v1.Ledger --endpoint 127.0.0.1:50062
    python -m reflection_cache.cli rpcauthz.demo.v1.Ledger --endpoint 127.0.0.1:50062 --json

Prints each method's declared option, the mode that applies and where it comes from
(method / service / default). Exit status 0 on success; 2 with ``error: <code>: <message>``
on stderr when the options cannot be learned (the gateway would refuse those calls).
"""
from __future__ import annotations

import asyncio
import json

import typer

from policy import Mode
from reflection_cache.client import ChannelPool, ReflectionClient, tls_credentials
from reflection_cache.endpoints import EndpointResolver
from reflection_cache.types import ReflectionError, ServiceModes


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
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
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
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if default is Mode.UNSPECIFIED:
        typer.echo("error: --default-mode cannot be UNSPECIFIED", err=True)
        raise typer.Exit(2)

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
        typer.echo(f"error: {e.code}: {e}", err=True)
        raise typer.Exit(2) from None
    rows = describe(modes, default)
    if as_json:
        typer.echo(json.dumps({"service": service, "endpoint": where, "reflection": protocol,
                               "service_default": _name(modes.service_default), "methods": rows},
                              indent=2))
        return
    typer.echo(f"{service} at {where} (reflection {protocol})")
    typer.echo(f"service default: {_name(modes.service_default)}; configured default: {default.name}")
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
              for h, k in (("METHOD", "method"), ("DECLARED", "declared"), ("APPLIES", "applies"))]
    typer.echo(f"{'METHOD':<{widths[0]}}  {'DECLARED':<{widths[1]}}  {'APPLIES':<{widths[2]}}  FROM")
    for r in rows:
        typer.echo(f"{r['method']:<{widths[0]}}  {r['declared']:<{widths[1]}}  "
                   f"{r['applies']:<{widths[2]}}  {r['from']}")


def register(app: typer.Typer) -> None:
    """Add ``reflect`` to mpactl."""
    app.command("reflect")(reflect)


def main() -> None:
    typer.run(reflect)


if __name__ == "__main__":
    main()
