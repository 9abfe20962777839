"""``mpactl serve``: the ext_authz server."""
from __future__ import annotations

import pathlib

import typer

from rpcauthz.server_start import flag_overrides, load_or_exit, start_or_exit


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
    from .config import load_settings
    from .server import run

    overrides = flag_overrides({"workers": workers, "listen.port": port, "store_url": store_url,
                                "identity.dev_mode": dev_mode})
    settings = load_or_exit(lambda: load_settings(config, overrides=overrides))
    raise typer.Exit(start_or_exit(lambda: run(settings)))
