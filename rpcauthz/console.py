"""One command-line style for ``mpa`` and ``mpactl``: exit codes, errors, ``--json``, consoles.

Every command of both tools reports a failure through :func:`fail` (``error: MESSAGE`` on
stderr, then the exit code), chooses its exit code from :class:`ExitCode` (the table in
README.md, "Exit codes"), prints ``--json`` output through :func:`print_json`, and prints
human output through :func:`stdout_console`, which never wraps ids or links when stdout is
not a terminal (a pipe, a file, a test).

This module belongs to the ``rpcauthz`` plumbing: it imports no other package of ours.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import IntEnum
from importlib import metadata
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console
from rich.text import Text

#: Width used for output that is not a terminal: wide enough that no table row, id or link
#: is ever folded (rich sizes tables to their content, so nothing is padded to this width).
PIPE_WIDTH = 100_000


class ExitCode(IntEnum):
    """Exit status of every ``mpa`` and ``mpactl`` command (README.md, "Exit codes")."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_SIGNED_IN = 3
    UNREACHABLE = 4
    DRY_RUN = 5
    NOT_VERIFIED = 6

    @property
    def meaning(self) -> str:
        """One line saying what the code means (the README table's third column)."""
        return _MEANINGS[self]


_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.FAILURE: "refused or failed; the message says why (lint findings, a refusal by the server, nothing to do)",
    ExitCode.USAGE: "bad usage or input: a wrong flag or argument, a file that does not parse, an unknown name",
    ExitCode.NOT_SIGNED_IN: "not signed in: no token, or the token was refused (expired, forged)",
    ExitCode.UNREACHABLE: "a server, the broker, the store or a reflection endpoint cannot be reached or is unavailable",
    ExitCode.DRY_RUN: "`mpactl envoy dry-run`: some services are still in dry-run",
    ExitCode.NOT_VERIFIED: "a build, a signed receipt or the audit chain does not verify: do not trust it "
                           "(`mpactl broker trust check`, `trust accept`, `audit verify`, `audit export`)",
}


def make_console(file: TextIO | None = None, *, stderr: bool = False) -> Console:
    """A rich console that never wraps or folds text when its stream is not a terminal.

    On a terminal it behaves as rich always does (width of the terminal, colours); anywhere
    else ids, links and table rows stay on one line each, whatever their length.
    """
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if _is_terminal(stream):
        return Console(file=file, stderr=stderr, soft_wrap=True)
    return Console(file=file, stderr=stderr, soft_wrap=True, width=PIPE_WIDTH, no_color=True,
                   highlight=False)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stdout_console() -> Console:
    """The console for a command's human output (stdout as it is now)."""
    return make_console()


def stderr_console() -> Console:
    """The console for progress and error messages (stderr as it is now)."""
    return make_console(stderr=True)


def fail(message: str, code: ExitCode | int = ExitCode.FAILURE) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit the process with ``code`` (an :class:`ExitCode`).

    The message is printed as it is (no markup or emoji codes are interpreted, nothing is
    wrapped when stderr is not a terminal).
    """
    stderr_console().print(Text.assemble(("error:", "bold red"), " ", message))
    # SystemExit rather than typer.Exit: it ends the process with ``code`` inside a command
    # and outside one alike (click lets it through; Typer's CliRunner records its code).
    raise SystemExit(int(code))


def warn(message: str) -> None:
    """Print ``warning: MESSAGE`` on stderr (the command goes on)."""
    stderr_console().print(Text.assemble(("warning:", "bold yellow"), " ", message))


def json_text(data: Any) -> str:
    """``data`` as the JSON every ``--json`` prints (indented, keys in the order given)."""
    return json.dumps(data, indent=2, default=str)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout, byte for byte (no colours, no wrapping)."""
    sys.stdout.write(json_text(data) + "\n")
    sys.stdout.flush()


def emit(data: Any, as_json: bool, printer: Callable[[Any], None]) -> None:
    """Print ``data`` as JSON with ``--json``, otherwise through ``printer`` for people."""
    if as_json:
        print_json(data)
    else:
        printer(data)


def JsonOption(help: str = "Print JSON for scripts instead of text.") -> Any:
    """The ``--json`` flag, the same on every command that lists or shows something."""
    return typer.Option(False, "--json", help=help)


def package_version(distribution: str = "rpcauthz") -> str:
    """The installed version of ``distribution`` (``unknown`` when it is not installed)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def version_option(tool: str) -> Any:
    """An eager ``--version`` flag that prints ``TOOL VERSION`` and exits 0."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{tool} {package_version()}")
            raise typer.Exit(int(ExitCode.OK))

    return typer.Option(False, "--version", callback=show, is_eager=True,
                        help=f"Print {tool}'s version and exit.")
