"""rpcauthz.console: the one exit-code table, ``fail``, ``--json`` output and the no-wrap console."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from rpcauthz.console import ExitCode, JsonOption, emit, fail, stdout_console

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_exit_codes() -> list[tuple[int, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    return [(int(m[1]), m[2], m[3]) for m in re.finditer(r"^\| (\d+) \| `([A-Z_]+)` \| (.+?) \|$", section, re.M)]


def test_readme_table_equals_the_enum():
    assert readme_exit_codes() == [(c.value, c.name, c.meaning) for c in ExitCode]


def test_the_codes_the_issue_names():
    assert (ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE, ExitCode.NOT_SIGNED_IN, ExitCode.UNREACHABLE) == (0, 1, 2, 3, 4)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def show(what: str, as_json: bool = JsonOption()) -> None:
        if what == "missing":
            fail("no thing named 'missing' [not_found] :warning: is literal", ExitCode.UNREACHABLE)
        if what == "default":
            fail("refused")
        emit({"name": what, "link": "https://example.com/" + "x" * 300}, as_json,
             lambda d: stdout_console().print(f"{d['name']} {d['link']}"))
    return app


def test_fail_prints_the_message_as_it_is_and_exits_with_the_code():
    runner = CliRunner()
    res = runner.invoke(_app(), ["missing"])
    assert res.exit_code == 4
    assert res.stderr == "error: no thing named 'missing' [not_found] :warning: is literal\n"
    assert res.stdout == ""
    res = runner.invoke(_app(), ["default"])
    assert (res.exit_code, res.stderr) == (1, "error: refused\n")


def test_json_and_text_output():
    runner = CliRunner()
    res = runner.invoke(_app(), ["thing", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["name"] == "thing"
    res = runner.invoke(_app(), ["thing"])
    assert res.exit_code == 0 and res.stdout == f"thing https://example.com/{'x' * 300}\n"


def test_piped_output_never_wraps_ids_or_links():
    """A real process whose stdout is a pipe, with a narrow COLUMNS: tables and links stay whole."""
    code = ("from rich.table import Table\n"
            "from rpcauthz.console import stdout_console\n"
            "t = Table()\n"
            "t.add_column('id', overflow='fold'); t.add_column('link')\n"
            "t.add_row('req-' + 'a' * 120, 'https://approvals.example.com/requests/' + 'b' * 150)\n"
            "c = stdout_console(); c.print(t); c.print('link: https://x.example.com/' + 'c' * 200)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "COLUMNS": "40", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if "req-" in line]
    assert len(row) == 1 and ("req-" + "a" * 120) in row[0]
    assert ("https://approvals.example.com/requests/" + "b" * 150) in row[0]
    assert ("link: https://x.example.com/" + "c" * 200 + "\n") in out.stdout
    assert "\x1b[" not in out.stdout  # no colour codes in a pipe


def test_fail_outside_a_command_ends_the_process_with_the_code():
    out = subprocess.run([sys.executable, "-c", "from rpcauthz.console import ExitCode, fail\n"
                          "fail('store gone', ExitCode.UNREACHABLE)"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (4, "", "error: store gone\n")
