"""``mpactl serve``: the ext_authz server."""
from __future__ import annotations

import pathlib

import typer
import yaml

from rpcauthz.server_start import flag_overrides, load_or_exit, start_or_exit


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``mpactl``."""
    app.command("serve", help="Run the Envoy ext_authz gRPC server (Authorization + health + metrics).")(serve)
    app.command("dev-certs", help="Write a dev CA and the Envoy<->ext_authz mTLS certificates (not for production).")(dev_certs)


def dev_certs(
    out: pathlib.Path = typer.Option(..., "--out", help="Directory for ca.crt, extauthz.crt/.key, envoy.crt/.key."),
    days: int = typer.Option(30, "--days", min=1, help="Validity of the CA and certificates."),
    server_name: list[str] = typer.Option([], "--server-name", help="Extra DNS name for the server certificate (repeatable)."),
) -> None:
    """Make a dev CA, a server certificate for ``mpactl serve`` and Envoy's client certificate."""
    from .dev_certs import make_dev_certs

    certs = make_dev_certs(out, days=days, extra_server_names=tuple(server_name))
    typer.echo(f"wrote {certs.ca}, {certs.server_cert}, {certs.client_cert} (and keys, mode 0600)")
    typer.echo("server config (mpactl serve --config):")
    typer.echo(yaml.safe_dump({"listen": {"tls": certs.server_settings()}}, sort_keys=False).rstrip())
    typer.echo(f"Envoy's ext_authz cluster transport_socket: trusted_ca {certs.ca}, "
               f"certificate_chain {certs.client_cert}, private_key {certs.client_key}")


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
