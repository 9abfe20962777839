"""``mpactl`` commands of the enclave bridge: ``forward`` (and, from the broker, ``broker``)."""
from __future__ import annotations

import asyncio
import logging
import sys

import typer

from rpcauthz.console import ExitCode, fail

from .addresses import AddressError, parse_address


def forward(
    listen: str = typer.Option(..., "--listen", metavar="URL",
                               help="Where to accept connections: tcp://HOST:PORT, unix:///PATH or vsock://CID:PORT "
                                    "(CID 'any' listens on every CID)."),
    to: str = typer.Option(..., "--to", metavar="URL",
                           help="Where to forward each connection: tcp://HOST:PORT, unix:///PATH or vsock://CID:PORT "
                                "(the parent instance is CID 3)."),
    max_connections: int = typer.Option(256, min=1, help="Connections forwarded at once; extras are refused or queued."),
    queue_timeout: float = typer.Option(0.0, min=0, help="Seconds an extra connection waits for a free slot (0: refuse at once)."),
    connect_timeout: float = typer.Option(5.0, min=0.001, help="Seconds to reach the target before giving up on a connection."),
    idle_timeout: float = typer.Option(300.0, min=0, help="Close a connection after this many seconds with no bytes either way (0: never)."),
    shutdown_grace: float = typer.Option(10.0, min=0, help="On SIGTERM, seconds in-flight connections get to finish (a second SIGTERM cuts them at once)."),
    buffer_size: int = typer.Option(65536, min=1024, max=16 * 1024 * 1024, help="Bytes buffered per direction per connection."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Forward TCP/unix/vsock connections byte for byte (no TLS termination).

    Parent instance:  mpactl forward --listen tcp://127.0.0.1:8443 --to vsock://16:8443
    Inside enclave:   mpactl forward --listen vsock://any:8443 --to tcp://127.0.0.1:9443
    """
    from .forward import ForwarderConfig, run

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ForwarderConfig(
            listen=_address("--listen", listen, "listen"), target=_address("--to", to, "connect"),
            max_connections=max_connections, queue_timeout=queue_timeout, connect_timeout=connect_timeout,
            idle_timeout=idle_timeout or None, shutdown_grace=shutdown_grace, buffer_size=buffer_size)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e

    def ready(forwarder) -> None:
        print(f"forwarding {forwarder.bound_address} -> {config.target}", flush=True)

    try:
        stats = asyncio.run(run(config, ready=ready))
    except OSError as e:
        fail(f"cannot listen on {listen}: {e}", ExitCode.FAILURE)
    print(f"stopped: {stats}", flush=True)


def _address(option: str, url: str, role):
    try:
        return parse_address(url, role)
    except AddressError as e:
        raise typer.BadParameter(str(e), param_hint=option) from e


def register(app: typer.Typer) -> None:
    """Add the enclave bridge's commands to ``mpactl``: ``forward`` here, ``broker`` from broker_cli."""
    app.command("forward")(forward)
    from . import broker_cli

    broker_cli.register(app)


def _standalone() -> typer.Typer:
    """The same commands without the rest of mpactl: ``python -m enclave_bridge.cli forward ...``."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)

    @app.callback()
    def _group() -> None:
        """Enclave bridge commands."""

    register(app)
    return app


if __name__ == "__main__":
    _standalone()()
