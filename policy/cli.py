"""Operator commands for grants and the store: ``mpactl sync``, ``mpactl grants``, ``mpactl db``.

Every command takes ``--store URL`` (or ``$RPCAUTHZ_STORE_URL``, the one store variable of every
command and server): ``sqlite:///ABS/PATH.db`` or ``postgresql://user@host:port/db``. Exit codes
(README.md, "Exit codes"): 1 a refusal (malformed catalog, nothing to sync, no such grant), 2 a bad
store URL, 4 the store cannot be reached.
"""
from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from rpcauthz.console import ExitCode, JsonOption, fail, print_json

from .errors import StoreError
from .model import Grant, Role

if TYPE_CHECKING:
    from .store import Store

STORE_ENV = "RPCAUTHZ_STORE_URL"

_STORE_HELP = ("Store URL: sqlite:///ABSOLUTE/PATH.db or postgresql://user@host:port/dbname "
               f"(default: ${STORE_ENV}).")


def _store_option() -> Any:
    return typer.Option(..., "--store", envvar=STORE_ENV, help=_STORE_HELP, show_default=False)


def _actor() -> str:
    try:
        return f"mpactl:{getpass.getuser()}"
    except Exception:
        return "mpactl"


def _with_store(url: str, body: Callable[[Store], object]) -> None:
    """Open the store, run ``body``, close it; a bad URL exits 2, a store error 4, with a message."""
    from .stores import open_store
    try:
        store = open_store(url)
    except ValueError as e:
        fail(str(e), ExitCode.USAGE)
    except StoreError as e:
        fail(str(e), ExitCode.UNREACHABLE)
    try:
        body(store)
    except StoreError as e:
        fail(str(e), ExitCode.UNREACHABLE)
    finally:
        store.close()


def grant_json(g: Grant, now: datetime) -> dict[str, Any]:
    """One grant as ``--json`` prints it: principal, role, service, expires_at, source, active."""
    return {"principal": g.principal, "role": g.role.value, "service": g.service,
            "expires_at": g.expires_at.isoformat() if g.expires_at else None,
            "source": g.source, "active": g.active(now)}


def _describe(g: Grant) -> str:
    parts = [g.role.value, g.principal]
    if g.service:
        parts.append(g.service)
    if g.expires_at:
        parts.append(f"until {g.expires_at.isoformat()}")
    return " ".join(parts) + f"  ({g.source})"


def _parse_time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{what} {text!r} is not an ISO 8601 time like "
                                 "2026-12-01T09:00:00Z") from None
    if value.tzinfo is None:
        raise typer.BadParameter(f"{what} {text!r} needs a timezone, e.g. {text}Z")
    return value


def register(app: typer.Typer) -> None:
    """Add ``sync``, ``grants`` and ``db`` to ``mpactl``."""

    @app.command("sync")
    def sync_cmd(
        store: str = _store_option(),
        catalog: list[Path] = typer.Option(
            [], "--catalog", help="Backstage catalog YAML file or directory (repeatable). "
            "Component spec.owner -> Group spec.members become contributor grants for the "
            "services in the rpcauthz.io/grpc-services annotation; every group member is an engineer."),
        oncall: Path | None = typer.Option(
            None, "--oncall", help="YAML file with a security_oncall list of principals "
            "(optionally {principal, until}). Omit to leave on-call grants as they are."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print what would change; write nothing."),
        as_json: bool = JsonOption("Print the changes as JSON: {dry_run, sources: {SOURCE: {added, removed}}}, "
                                   "each grant as `grants list --json` prints it."),
    ) -> None:
        """Make contributor, engineer and security on-call grants match the catalog and on-call file.

        Adds and removes exactly the grants these sources manage (sync:catalog, sync:oncall);
        grants added by hand are never touched. Nothing is written if any input is malformed.
        """
        from .sync import SyncError, sync

        def run(s: Store) -> None:
            try:
                diffs = sync(s, catalog=catalog, oncall=oncall, dry_run=dry_run, actor=_actor())
            except SyncError as e:
                fail(str(e))
            if as_json:
                now = datetime.now(UTC)
                print_json({"dry_run": dry_run, "sources": {
                    source: {"added": [grant_json(g, now) for g in diff.added],
                             "removed": [grant_json(g, now) for g in diff.removed]}
                    for source, diff in diffs.items()}})
                return
            verb_add, verb_remove = ("would add", "would remove") if dry_run else ("added", "removed")
            for source, diff in diffs.items():
                for g in diff.added:
                    typer.echo(f"+ {_describe(g)}")
                for g in diff.removed:
                    typer.echo(f"- {_describe(g)}")
                typer.echo(f"{source}: {verb_add} {len(diff.added)}, {verb_remove} {len(diff.removed)}")

        _with_store(store, run)

    grants = typer.Typer(help="List, add and remove role grants by hand (source 'manual').",
                         no_args_is_help=True)
    app.add_typer(grants, name="grants")

    @grants.command("list")
    def grants_list(
        store: str = _store_option(),
        principal: str | None = typer.Option(None, help="Only this principal's grants."),
        as_json: bool = JsonOption("One JSON object per line: principal, role, service, expires_at, "
                                   "source, active."),
    ) -> None:
        """Print every grant (expired ones are marked)."""
        def run(s: Store) -> None:
            now = datetime.now(UTC)
            for g in s.list_grants():
                if principal and g.principal != principal:
                    continue
                if as_json:
                    typer.echo(json.dumps(grant_json(g, now)))
                else:
                    typer.echo(_describe(g) + ("" if g.active(now) else "  [expired]"))
        _with_store(store, run)

    @grants.command("add")
    def grants_add(
        principal: str = typer.Argument(..., help="Who, as the gateway sees them (e.g. an email)."),
        role: Role = typer.Argument(..., help="engineer, contributor, security_oncall or auditor (reads every request in the approvals service)."),
        service: str | None = typer.Option(None, help="For contributor: the gRPC service, e.g. pay.v1.Payments."),
        expires: str | None = typer.Option(None, help="Expiry, ISO 8601 with timezone."),
        store: str = _store_option(),
    ) -> None:
        """Add (or replace) a manual grant."""
        try:
            grant = Grant(principal, role, service=service,
                          expires_at=_parse_time(expires, "--expires"))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

        def run(s: Store) -> None:
            s.put_grant(grant, actor=_actor())
            typer.echo(f"+ {_describe(grant)}")
        _with_store(store, run)

    @grants.command("remove")
    def grants_remove(
        principal: str = typer.Argument(...),
        role: Role = typer.Argument(...),
        service: str | None = typer.Option(None, help="For contributor: the gRPC service."),
        store: str = _store_option(),
    ) -> None:
        """Remove a grant (whatever its source; a sync may add a synced one back)."""
        def run(s: Store) -> None:
            if not s.delete_grant(principal, role, service, actor=_actor()):
                fail(f"no {role.value} grant for {principal}" + (f" on {service}" if service else ""))
            typer.echo(f"- {role.value} {principal}" + (f" {service}" if service else ""))
        _with_store(store, run)

    db = typer.Typer(help="Create and inspect the store's schema.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @db.command("init")
    def db_init(store: str = _store_option(),
                as_json: bool = JsonOption("Print {store, schema_version} as JSON.")) -> None:
        """Create the tables if they do not exist (safe to run again) and print the schema version."""
        from .stores import redact_url

        def run(s: Any) -> None:
            if as_json:
                print_json({"store": redact_url(store), "schema_version": s.schema_version()})
            else:
                typer.echo(f"{redact_url(store)}: schema version {s.schema_version()}")
        _with_store(store, run)


def main() -> None:  # pragma: no cover - convenience for `python -m policy.cli`
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    app(prog_name="mpactl")


if __name__ == "__main__":  # pragma: no cover
    main()
