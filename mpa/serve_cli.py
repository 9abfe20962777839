"""``mpactl approvals serve``: the approvals server in the foreground, from a YAML file."""
from __future__ import annotations

import pathlib
import signal
import threading

import typer

from rpcauthz.server_start import flag_overrides, load_or_exit, start_or_exit


def register(app: typer.Typer) -> None:
    """Add ``approvals serve`` to ``mpactl``."""
    group = typer.Typer(help="The approvals service (API, approval page, Slack, audit export).",
                        no_args_is_help=True)
    group.command("serve", help="Run the approvals server until SIGTERM.")(serve)
    app.add_typer(group, name="approvals")


def serve(
    config: pathlib.Path | None = typer.Option(
        None, "--config", "-c", help="YAML config file (see docs/approvals.md); RPCAUTHZ_* "
                                     "environment variables override it."),
    port: int | None = typer.Option(None, "--port", help="Override listen.port."),
    store_url: str | None = typer.Option(None, "--store", help="Override store_url "
                                            "(sqlite:///path.db or postgresql://...; "
                                            "env RPCAUTHZ_STORE_URL)."),
) -> None:
    """Run the approvals server until SIGTERM or Ctrl-C."""
    from .config import load_approvals_config
    from .server import start_approvals_server

    overrides = flag_overrides({"listen.port": port, "store_url": store_url})
    settings = load_or_exit(lambda: load_approvals_config(config, overrides=overrides))
    mode_lookup = body_encoder = None
    if settings.reflection is not None:
        from reflection_cache.cache import ReflectionCache

        from .body_types import reflected_bodies
        from .service import lazy_modes
        reflection = settings.reflection
        mode_lookup = lazy_modes(lambda: ReflectionCache.from_settings(reflection),
                                 settings.default_mode)
        body_encoder = reflected_bodies(lambda: ReflectionCache.from_settings(reflection))
    handle = start_or_exit(lambda: start_approvals_server(settings, host=settings.listen.host,
                                                          port=settings.listen.port, mode_lookup=mode_lookup,
                                                          body_encoder=body_encoder),
                           errors=(OSError, RuntimeError, ValueError))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    if handle.dev_jwks_url:
        typer.echo(f"DEV issuer {handle.config.issuer}: JWKS at {handle.dev_jwks_url}")
    typer.echo(f"approvals server listening on {handle.url}")
    done.wait()
    handle.close()
