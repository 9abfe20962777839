"""``mpactl demo`` (run everything), ``mpactl demo call`` and ``mpactl demo approve``."""
from __future__ import annotations

import json
import pathlib

import typer

from rpcauthz.console import ExitCode, JsonOption, fail, print_json

demo_app = typer.Typer(
    help="Run the whole gateway on this machine (Envoy, ext_authz on SQLite, two demo services, "
         "a dev token issuer) and try calls as different people.",
    invoke_without_command=True, no_args_is_help=False)

DIR_HELP = "The demo's working directory (default: the demo started last)."


@demo_app.callback()
def demo(ctx: typer.Context,
         dir: pathlib.Path | None = typer.Option(None, "--dir", help="Keep the demo's files "
                                                    "here (default: a temporary directory, removed at exit)."),
         port: int | None = typer.Option(None, "--port", help="Gateway port (default: a free one).")) -> None:
    """Start the demo and print commands to try; Ctrl-C stops it."""
    if ctx.invoked_subcommand is not None:
        return
    from .demo import run
    try:
        code = run(dir, port)
    except (OSError, RuntimeError, TimeoutError) as e:  # a part did not start: say which
        fail(f"the demo could not start: {e}", ExitCode.FAILURE)
    raise typer.Exit(code)


@demo_app.command("call")
def call(path: str = typer.Argument(..., help="The method, e.g. /rpcauthz.demo.v1.Accounts/ListAccounts"),
         as_: str = typer.Option(..., "--as", help="Who calls (a demo person, e.g. alice)."),
         data: str = typer.Option("{}", "--data", help="The request message as JSON."),
         dir: pathlib.Path | None = typer.Option(None, "--dir", help=DIR_HELP),
         as_json: bool = JsonOption("Print JSON: {status, code, message, request_url, replies}.")) -> None:
    """Call a method through the demo gateway with a fresh dev token; print status and message.

    Exit status 0 when the call succeeded, 1 when the gateway or the service refused it.
    """
    from devstack.devissuer import DevIssuer

    from .demo import load_state
    from .democlient import call as do_call

    try:
        state = load_state(dir)
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("--data must be a JSON object")
        token = DevIssuer(pathlib.Path(state["issuer_key"])).mint(as_)
        result = do_call(state["gateway"], path, token=token, data=fields)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), ExitCode.USAGE)
    if as_json:
        print_json(result.to_json())
    else:
        typer.echo(result.render())
    raise typer.Exit(ExitCode.OK if result.code.name == "OK" else ExitCode.FAILURE)


@demo_app.command("approve")
def approve(request_id: str = typer.Argument(..., help="The request id (the end of the request link)."),
            as_: str = typer.Option(..., "--as", help="Who approves (must be eligible, not the requester)."),
            reason: str = typer.Option("demo", "--reason", help="The requester's reason, if not given yet."),
            incident: str | None = typer.Option(None, "--incident", help="Incident reference "
                                                   "(break-glass requests need one)."),
            dir: pathlib.Path | None = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """Approve a pending request in the demo's store (what the approval page does)."""
    from .demo import load_state
    from .demo_approve import approve_request

    try:
        state = load_state(dir)
        typer.echo(approve_request(state["store_url"], request_id, as_, reason=reason, incident=incident))
    except Exception as e:
        fail(str(e), ExitCode.FAILURE)


def register(app: typer.Typer) -> None:
    """Add ``demo`` (with ``demo call`` and ``demo approve``) to ``mpactl``."""
    app.add_typer(demo_app, name="demo")
