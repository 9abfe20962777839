"""``mpactl`` and ``mpa`` as a newcomer meets them: --version, --help, shell completion."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from importlib import metadata

import pytest
import typer

import mpa.cli
import mpactl.app

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLS = {"mpactl": "mpactl.app", "mpa": "mpa.cli"}


def run(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", TOOLS[tool], *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_version_comes_from_the_package_metadata(tool):
    out = run(tool, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tool} {metadata.version('rpcauthz')}\n"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_shell_completion_can_be_shown_and_installed(tool, tmp_path):
    # Typer's own switch for naming the shell: otherwise it detects the shell among this
    # process's ancestors (none when the test runner was started in the background).
    named = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = run(tool, "--show-completion", "bash", env=named)
    assert out.returncode == 0, out.stderr
    assert f"_{tool}_completion" in out.stdout and f"_{tool.upper()}_COMPLETE" in out.stdout

    out = run(tool, "--install-completion", "bash", env={"HOME": str(tmp_path), **named})
    assert out.returncode == 0, out.stderr
    script = tmp_path / ".bash_completions" / f"{tool}.sh"
    assert f"_{tool.upper()}_COMPLETE" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text() or f".bash_completions/{tool}.sh" in (
        tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_top_level_help_says_where_to_start_and_names_every_command(tool):
    out = run(tool, "--help", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "--version" in out.stdout and "--install-completion" in out.stdout
    assert "Exit codes" in out.stdout and "--json" in out.stdout
    assert ("mpactl demo" if tool == "mpactl" else "mpa login") in out.stdout
    group = typer.main.get_command(mpactl.app.app if tool == "mpactl" else mpa.cli.app)
    for name in group.commands:
        assert name in out.stdout


def _commands(group, prefix: tuple[str, ...] = ()):
    """Every (sub)command of a Typer app's command tree (Typer vendors its own click: duck-typed)."""
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


def _options(cmd):
    return [p for p in cmd.params if p.param_type_name == "option"]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_command_and_option_is_explained(tool):
    """Every (sub)command has a one-line description; every option has help text."""
    group = typer.main.get_command(mpactl.app.app if tool == "mpactl" else mpa.cli.app)
    missing = []
    assert len(list(_commands(group))) > 10
    for path, cmd in _commands(group):
        if not (cmd.help or cmd.short_help or "").strip():
            missing.append(" ".join(path))
        for p in _options(cmd):
            if not (p.help or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert missing == [], f"{tool}: no help text for: {missing}"


#: Short flags shared by options with different long names but one meaning.
SHARED = {"-m": {"--comment", "--reason"}}  # mpa approve/reject/cancel: the words for the record


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_short_flags_have_one_meaning(tool):
    """-o is --output wherever it appears; no short flag stands for two different long options."""
    group = typer.main.get_command(mpactl.app.app if tool == "mpactl" else mpa.cli.app)
    meaning: dict[str, set[str]] = {}
    for _, cmd in _commands(group):
        for p in _options(cmd):
            shorts = [o for o in p.opts + p.secondary_opts if len(o) == 2]
            longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
            for s in shorts:
                meaning.setdefault(s, set()).update(longs[:1])
    assert meaning, "no short flags found: the walk over the command tree is broken"
    assert meaning.get("-o", {"--output"}) == {"--output"}
    assert {s: m for s, m in meaning.items() if len(m) > 1 and m != SHARED.get(s)} == {}


def test_unknown_command_is_a_usage_error():
    out = run("mpactl", "frobnicate")
    assert out.returncode == 2 and "frobnicate" in out.stderr


#: Every command that lists or shows something (README.md, "Command lines").
LISTS_OR_SHOWS = {
    "mpa": [("whoami",), ("list",), ("show",), ("approve",), ("reject",), ("cancel",), ("request", "rpc"),
            ("request", "aws"), ("request", "k8s"), ("broker", "list"), ("broker", "show"), ("broker", "review")],
    "mpactl": [("grants", "list"), ("db", "init"), ("sync",), ("reflect",), ("lint",), ("usage",),
               ("envoy", "dry-run"), ("demo", "call"), ("broker", "measure"), ("broker", "trust", "show")],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_command_that_lists_or_shows_takes_json(tool):
    commands = dict(_commands(typer.main.get_command(mpactl.app.app if tool == "mpactl" else mpa.cli.app)))
    without = [" ".join(path) for path in LISTS_OR_SHOWS[tool]
               if "--json" not in {o for p in _options(commands[path]) for o in p.opts}]
    assert without == []
