"""``mpactl broker ...``: run the credential broker and manage its trusted measurement.

``register(app)`` adds a ``broker`` command group:

* ``mpactl broker measure``  build the broker artifact twice from a commit; print its SHA-384
* ``mpactl broker trust propose|report|show``  the two-approver rule for the trusted measurement
* ``mpactl broker serve``  run the broker (inside the enclave, or simulated locally)
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from . import measure as measure_mod

DEFAULT_LEDGER = Path("measurements.json")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"mpactl broker: {message}", err=True)
    raise typer.Exit(code)


def _approvers(value: str) -> frozenset[str]:
    path = Path(value)
    names = path.read_text().split() if path.exists() else value.split(",")
    found = frozenset(n.strip() for n in names if n.strip())
    if len(found) < 2:
        _fail("--approvers must name at least two measurement approvers (comma list or a file)")
    return found


def register(app: typer.Typer) -> None:
    broker = typer.Typer(help="Run the enclave credential broker and manage its trusted measurement.",
                         no_args_is_help=True)
    app.add_typer(broker, name="broker")
    trust = typer.Typer(help="Change the trusted measurement: two approvers must build the same hash.",
                        no_args_is_help=True)
    broker.add_typer(trust, name="trust")

    @broker.command("measure")
    def measure(repo: Path = typer.Option(Path("."), "--repo", help="the git repository to build from"),
                rev: str = typer.Option("HEAD", "--rev", help="commit, tag or branch to build"),
                out: Optional[Path] = typer.Option(None, "--out", help="also write the artifact here"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
        """Build the broker artifact twice from REV and print its SHA-384 (fails if the builds differ)."""
        try:
            m = measure_mod.measure(repo, rev, out=out)
        except measure_mod.BuildError as e:
            _fail(str(e))
        if as_json:
            typer.echo(json.dumps({"commit": m.commit, "sha384": m.sha384, "size": m.size}))
        else:
            typer.echo(f"commit  {m.commit}\nsha384  {m.sha384}\nsize    {m.size} bytes (built twice, identical)")

    @trust.command("propose")
    def propose(commit: str = typer.Option(..., "--commit", help="commit to trust (resolved in --repo)"),
                reason: str = typer.Option(..., "--reason", help="why this version"),
                who: str = typer.Option(..., "--as", help="your engineer id"),
                repo: Path = typer.Option(Path("."), "--repo"),
                ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger", help="the measurement ledger file")) -> None:
        """Propose trusting the build of a commit; two approvers must then report matching hashes."""
        try:
            full = measure_mod.resolve_commit(repo, commit)
            p = measure_mod.MeasurementLedger(ledger).propose(commit=full, proposer=who, reason=reason,
                                                              now=datetime.now(timezone.utc))
        except (measure_mod.BuildError, ValueError) as e:
            _fail(str(e))
        typer.echo(f"{p.id}  proposes commit {p.commit}\n"
                   f"Two approvers each run: mpactl broker trust report {p.id} --as THEM --approvers ...")

    @trust.command("report")
    def report(proposal_id: str, who: str = typer.Option(..., "--as", help="your engineer id"),
               approvers: str = typer.Option(..., "--approvers", help="measurement approvers: comma list or file"),
               repo: Path = typer.Option(Path("."), "--repo", help="your own clone to build from"),
               ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger")) -> None:
        """Build the proposal's commit yourself and report the hash you got."""
        from policy import PolicyError
        allowed = _approvers(approvers)
        led = measure_mod.MeasurementLedger(ledger)
        try:
            p = led.get(proposal_id)
            m = measure_mod.measure(repo, p.commit)
            p = led.report(proposal_id, approver=who, sha384_hex=m.sha384, approvers=allowed,
                           now=datetime.now(timezone.utc))
        except KeyError as e:
            _fail(str(e.args[0]))
        except (measure_mod.BuildError, PolicyError) as e:
            _fail(str(e))
        typer.echo(f"you built {m.sha384}\nproposal {p.id} is {p.state.value} "
                   f"({len(p.reports)}/{p.required} reports)")
        if p.state is measure_mod.ProposalState.DISPUTED:
            _fail("hashes differ between approvers: the proposal can never be accepted; find out why", 3)

    @trust.command("show")
    def show(ledger: Path = typer.Option(DEFAULT_LEDGER, "--ledger")) -> None:
        """Print the trusted measurement in force."""
        t = measure_mod.MeasurementLedger(ledger).trusted()
        typer.echo(json.dumps(t, indent=1) if t else "no trusted measurement yet")


def main() -> None:
    app = typer.Typer(name="mpactl", no_args_is_help=True, add_completion=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
