"""``mpactl serve``: the ext_authz server."""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``mpactl``."""
    app.command("serve", help="Run the Envoy ext_authz gRPC server (Authorization + health + metrics).")(serve)


def serve(
    config: pathlib.Path | None = typer.Option(
        None, "--config", "-c", help="YAML config file (see docs/extauthz.md); RPCAUTHZ_* "
                                     "environment variables override it."),
    workers: int | None = typer.Option(None, "--workers", "-w", min=1,
                                          help="Worker processes sharing the port (SO_REUSEPORT)."),
    port: int | None = typer.Option(None, "--port", help="Override listen.port."),
    store_url: str | None = typer.Option(None, "--store", help="Override store_url "
                                            "(sqlite:///path.db or postgresql://...; "
                                            "env RPCAUTHZ_STORE_URL)."),
    dev_mode: bool = typer.Option(False, "--dev-mode", help="DEV ONLY: take the caller from a "
                                  "header instead of a verified token."),
) -> None:
    """Run the ext_authz server until SIGTERM (then drain)."""
    from .config import ConfigError, load_settings
    from .server import run

    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["workers"] = workers
    if port is not None:
        overrides["listen.port"] = port
    if store_url is not None:
        overrides["store_url"] = store_url
    if dev_mode:
        overrides["identity.dev_mode"] = True
    try:
        settings = load_settings(config, overrides=overrides)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = run(settings)
    except OSError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
