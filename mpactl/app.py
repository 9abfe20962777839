"""``mpactl``: the operators' command line.

Each package keeps its operator commands next to its code, in a ``cli`` module with a
``register(app)`` function; this root imports them plainly and puts them under one app.
"""
from __future__ import annotations

import typer

from devstack import cli as devstack_cli
from enclave_bridge import cli as enclave_bridge_cli
from extauthz import cli as extauthz_cli
from mpa import serve_cli as mpa_serve_cli
from owners import cli as owners_cli
from policy import cli as policy_cli
from reflection_cache import cli as reflection_cache_cli
from rpcauthz.console import version_option

app = typer.Typer(
    name="mpactl",
    help="Operate the rpcauthz gateway: run the ext_authz server, sync grants, lint protos, "
         "render Envoy config, run the credential broker. New here? Try: mpactl demo",
    epilog="Every command: mpactl COMMAND --help. Commands that list or show something take --json. "
           "Exit codes: 0 done, 1 refused or failed, 2 bad usage or input, 3 not signed in, "
           "4 unreachable, 5 services in dry-run, 6 not verified (README.md, \"Exit codes\"). "
           "Shell completion: mpactl --install-completion.",
    no_args_is_help=True,
    add_completion=True,
)


@app.callback()
def _root(version: bool = version_option("mpactl")) -> None:
    """The mpactl command group (``--version`` is its only option)."""


extauthz_cli.register(app)          # serve
mpa_serve_cli.register(app)         # approvals serve
devstack_cli.register(app)          # demo
reflection_cache_cli.register(app)  # reflect
policy_cli.register(app)            # sync, grants, db
owners_cli.register(app)            # lint, migrate, usage, envoy render/validate/dry-run
enclave_bridge_cli.register(app)    # forward, broker


def main() -> None:
    """Entry point of the ``mpactl`` console script."""
    app(prog_name="mpactl")


if __name__ == "__main__":
    main()
