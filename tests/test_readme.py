"""README.md stays true: its commands exist with the flags it shows, its links resolve, its
Layout table names the folders there are.

Commands are run in-process with ``--help`` (Typer's test runner), so a renamed command or a
dropped flag fails here rather than in a newcomer's terminal.
"""
from __future__ import annotations

import pathlib
import re

import pytest
from typer.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section(title: str) -> str:
    """The text of README's ``## title`` section."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def expand(words: list[str]) -> list[list[str]]:
    """``grants list|add|remove`` -> three commands (alternatives in any word)."""
    out: list[list[str]] = [[]]
    for w in words:
        out = [prefix + [alt] for prefix in out for alt in w.split("|")]
    return out


def command_words(span: str) -> tuple[list[str], list[str]]:
    """The subcommand words and the ``--flags`` of one code span such as
    ``mpactl sync --store URL --catalog DIR [--oncall FILE]``."""
    tokens = span.replace("\\|", "|").split()
    words: list[str] = []
    for t in tokens[1:]:
        if t.startswith(("-", "[", "(")) or not re.fullmatch(r"[a-z][a-z0-9|-]*", t):
            break
        words.append(t)
    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)
    return words, flags


def mpactl_commands() -> list[tuple[list[str], list[str]]]:
    """Every command README's mpactl table and Configuration reference name, with its flags."""
    text = section("Command lines").split("`mpa` (engineers")[0]
    out = []
    for row in re.findall(r"^\| (.*?) \| .*\|$", text, re.M):
        spans = re.findall(r"`([^`]+)`", row)
        group = spans[0].split()[1] if spans and spans[0].startswith("mpactl ") else None
        for span in spans:
            # `mpactl demo` (`demo call`, `demo approve`): a short span names a subcommand of the
            # row's first command; other short spans are notes, not commands.
            if not span.startswith("mpactl "):
                if span.split()[0] != group:
                    continue
                span = f"mpactl {span}"
            words, flags = command_words(span)
            out += [(cmd, flags) for cmd in expand(words)]
    config = section("Configuration reference")
    for line in re.findall(r"^mpactl .*$", config.split("```")[1], re.M):
        words, flags = command_words(line.split("#")[0])
        out.append((words, flags))
    for span in re.findall(r"`(mpactl [^`]+)`", README):  # commands named in the prose too
        words, flags = command_words(span)
        out += [(cmd, flags) for cmd in expand(words)]
    unique: dict[str, tuple[list[str], list[str]]] = {}
    for cmd, flags in out:
        unique.setdefault(" ".join(cmd) + " " + " ".join(flags), (cmd, flags))
    return list(unique.values())


def mpa_commands() -> list[list[str]]:
    """Every command of README's ``mpa`` paragraph (``request rpc|aws|k8s`` -> three)."""
    para = section("Command lines").split("`mpa` (engineers", 1)[1].split("\n\n")[0]
    out = []
    for span in re.findall(r"`([^`]+)`", para):
        words = [w for w in span.split() if w != "..."]
        if words and not span.startswith(("mpa ", "MPA_")) and re.fullmatch(r"[a-z][a-z0-9|-]*", words[0]):
            out += expand(words)
    return out


def doc_commands() -> list[tuple[str, list[str], list[str]]]:
    """Every ``mpa ...``/``mpactl ...`` command README.md and docs/*.md show, in backticks or
    as a line of a shell block, as (tool, subcommand words, flags)."""
    out: dict[str, tuple[str, list[str], list[str]]] = {}
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"`((?:mpa|mpactl) [^`\n]+)`", text)
        fence: str | None = None  # the language of the fenced block we are in, if any
        for raw in text.splitlines():
            if raw.startswith("```"):
                fence = None if fence is not None else raw[3:].strip()
                continue
            if fence in ("", "sh", "bash", "console", "shell"):
                line = re.sub(r"^(\$ )?([A-Z_]+=\S+ )*", "", raw.strip())
                if re.match(r"(mpa|mpactl) ", line):
                    spans.append(line.split(" #")[0])
        for span in spans:
            words, flags = command_words(span)
            for cmd in expand(words):
                tool = span.split()[0]
                out.setdefault(" ".join([tool, *cmd, *flags]), (tool, cmd, flags))
    return list(out.values())


def help_text(app, argv: list[str]) -> str:
    res = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1"})
    assert res.exit_code == 0, f"{argv} --help exited {res.exit_code}: {res.output}"
    return res.output


MPACTL = mpactl_commands()


def test_the_tables_name_commands():
    named = {" ".join(cmd) for cmd, _ in MPACTL}
    assert {"serve", "approvals serve", "demo call", "grants add", "broker serve"} <= named, named
    assert {"login", "request aws", "fetch", "broker"} <= {" ".join(c) for c in mpa_commands()}


@pytest.mark.parametrize("cmd,flags", MPACTL, ids=[" ".join(c) for c, _ in MPACTL])
def test_mpactl_command_exists_with_its_flags(cmd, flags):
    from mpactl.app import app
    out = help_text(app, cmd)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", out)]
    assert not missing, f"mpactl {' '.join(cmd)} has no {missing}:\n{out}"


@pytest.mark.parametrize("cmd", mpa_commands(), ids=" ".join)
def test_mpa_command_exists(cmd):
    from mpa.cli import app
    help_text(app, cmd)


DOC_COMMANDS = doc_commands()


@pytest.mark.parametrize("tool,cmd,flags", DOC_COMMANDS, ids=[" ".join([t, *c, *f]) for t, c, f in DOC_COMMANDS])
def test_commands_shown_in_the_docs_exist_with_their_flags(tool, cmd, flags):
    from mpa.cli import app as mpa_app
    from mpactl.app import app as mpactl_app
    out = help_text(mpactl_app if tool == "mpactl" else mpa_app, cmd)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", out)]
    assert not missing, f"{tool} {' '.join(cmd)} has no {missing}:\n{out}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6} (.+)$", text, re.M):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_links_to_files_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_layout_table_names_every_top_level_folder():
    table = section("Layout")
    named = set()
    for cell in re.findall(r"^\| (.*?) \|", table, re.M):
        named |= {w.rstrip("/") for w in re.findall(r"`([\w.-]+/)`", cell)}
    folders = {p.name for p in ROOT.iterdir()
               if p.is_dir() and not p.name.startswith((".", "_")) and not p.name.endswith(".egg-info")
               and p.name not in {"build", "dist", "artifacts"}}  # outputs of builds and browser tests
    assert named == folders, f"only in README: {named - folders}; only on disk: {folders - named}"


def config_bullet(title: str) -> str:
    """The Configuration reference's bullet that starts with ``- **title**``."""
    m = re.search(rf"^- \*\*{re.escape(title)}\*\*(.*?)(?=^- |^\n|\Z)", section("Configuration reference"),
                  re.S | re.M)
    assert m, f"README's Configuration reference has no '{title}' bullet"
    return m.group(1)


def schemas():
    from enclave_bridge.broker.config import BrokerFile
    from extauthz.config import Settings
    from mpa.config import ApprovalsConfig
    from reflection_cache.settings import ReflectionSettings
    return [("ext_authz server", Settings), ("Approvals server", ApprovalsConfig), ("Broker", BrokerFile),
            ("Reflection", ReflectionSettings)]


@pytest.mark.parametrize("title", ["ext_authz server", "Approvals server", "Broker", "Reflection"])
def test_configuration_reference_names_every_top_level_key(title):
    model = dict(schemas())[title]
    named = set(re.findall(r"`([\w*]+)", config_bullet(title)))
    missing = [key for key in model.model_fields
               if key not in named and not any(n.endswith("*") and key.startswith(n[:-1]) for n in named)]
    assert not missing, f"README's '{title}' bullet does not name {missing}"


def test_files_named_in_the_docs_exist():
    """A path in backticks (`tests/x.py`, `envoy/gateway.yaml`, an import path under proto/) exists."""
    folders = "|".join(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")))
    path = re.compile(rf"`((?:{folders})/[\w./-]+\.(?:py|md|yaml|proto|pem))`")
    missing = [f"{doc.relative_to(ROOT)}: {p}" for doc in DOCS for p in path.findall(doc.read_text())
               if not (ROOT / p).exists() and not (ROOT / "proto" / p).exists()]  # proto imports
    assert not missing, "\n".join(missing)
