"""``mpactl``: the operators' command line. Each package contributes its own commands.

A package that offers operator commands has a module listed in ``COMMAND_MODULES`` with a
``register(app: typer.Typer) -> None`` function; this keeps each package's CLI next to its code.
"""
from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = (
    "extauthz.cli",         # serve, demo
    "reflection_cache.cli", # reflect
    "policy.cli",           # sync, grants, db
    "mpa.ops_cli",          # lint, migrate, usage, envoy render/validate
    "enclave_bridge.cli",   # forward, broker
)

app = typer.Typer(
    name="mpactl",
    help="Operate the rpcauthz gateway: run the ext_authz server, sync grants, lint protos, "
         "render Envoy config, run the credential broker.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keeps mpactl a command group even when only one package registers commands."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that package has no commands yet
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
