"""The fault suite (issue 9): every fault scenario against real Envoy, the ext_authz server as
a process, real PostgreSQL (through a TCP relay that is cut and hung; the machine's PostgreSQL
is never stopped), the demo services and the approvals service, under bounded loads.

Prints each scenario's detail as it finishes, then ONE table: calls sent, wrong allows,
UNAVAILABLE share, recovery seconds, audit events expected / written / duplicated, approval
uses spent / calls passed, and how many of the scenario's goals were met. Exit code 1 when a
goal was not met.

    python bench/fault_suite.py                       # everything, full fault lengths (~4 min)
    python bench/fault_suite.py --quick               # shorter faults
    python bench/fault_suite.py --scenario store-unreachable --scenario store-hung

PostgreSQL: ``--pg-dsn`` (default $RPCAUTHZ_TEST_PG_DSN, else
postgresql://postgres@127.0.0.1:5432/test); each scenario gets a fresh database, dropped after.
The scenarios are the functions in tests/support/faults/, which the CI tests also run.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.support.faults.forged_checks import forged_checks  # noqa: E402
from tests.support.faults.outcome import ScenarioResult, table  # noqa: E402
from tests.support.faults.pg import fresh_database  # noqa: E402
from tests.support.faults.reflection_faults import reflection_faults  # noqa: E402
from tests.support.faults.replica_faults import fast_path_failover, replica_kill9, rolling_restart  # noqa: E402
from tests.support.faults.server_kill9 import server_kill9, server_kill9_mid_spend  # noqa: E402
from tests.support.faults.slack_faults import slack_faults  # noqa: E402
from tests.support.faults.store_faults import (  # noqa: E402
    store_hang,
    store_locked,
    store_outage,
    store_outage_two_replicas,
)

Runner = Callable[[pathlib.Path, str, bool], "ScenarioResult | list[ScenarioResult]"]

#: name -> (needs PostgreSQL, run(workdir, dsn, quick))
SCENARIOS: dict[str, tuple[bool, Runner]] = {
    "replica-kill9": (True, lambda d, dsn, q: replica_kill9(d, dsn)),
    "rolling-restart": (True, lambda d, dsn, q: rolling_restart(d, dsn)),
    "fast-path-failover": (True, lambda d, dsn, q: fast_path_failover(d, dsn)),
    "store-unreachable": (True, lambda d, dsn, q: store_outage(d, dsn, seconds=10 if q else 30)),
    "store-unreachable-2": (True, lambda d, dsn, q: store_outage_two_replicas(d, dsn, seconds=10 if q else 15)),
    "store-hung": (True, lambda d, dsn, q: store_hang(d, dsn, seconds=5 if q else 10)),
    "store-locked": (True, lambda d, dsn, q: store_locked(d, dsn, seconds=8 if q else 12)),
    "server-kill9": (True, lambda d, dsn, q: server_kill9(d, dsn)),
    "server-kill9-spend": (True, lambda d, dsn, q: server_kill9_mid_spend(d, dsn)),
    "reflection": (False, lambda d, dsn, q: reflection_faults(d, seconds=3 if q else 6)),
    "slack": (False, lambda d, dsn, q: slack_faults(d, seconds=3 if q else 5)),
    "forged-check": (False, lambda d, dsn, q: forged_checks(d)),
}


def run(name: str, dsn: str, quick: bool) -> list[ScenarioResult]:
    needs_pg, fn = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
        try:
            if needs_pg:
                with fresh_database(dsn) as db:
                    out = fn(pathlib.Path(tmp), db, quick)
            else:
                out = fn(pathlib.Path(tmp), dsn, quick)
        except Exception as e:  # a scenario that broke is a failed row, not a lost run
            failed = ScenarioResult(f"{name} (did not finish)")
            failed.detail.append(traceback.format_exc())
            failed.goal("scenario ran to the end", False, f"{type(e).__name__}: {e}")
            return [failed]
    return out if isinstance(out, list) else [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true",
                    help="shorter faults (store unreachable 10 s, with two replicas too; hung 5 s, locked 8 s; reflection and Slack 3 s)")
    ap.add_argument("--pg-dsn", default=os.environ.get("RPCAUTHZ_TEST_PG_DSN",
                                                        "postgresql://postgres@127.0.0.1:5432/test"),
                    help="a PostgreSQL server where databases may be created (default: %(default)s)")
    args = ap.parse_args(argv)
    results: list[ScenarioResult] = []
    started = time.monotonic()
    for name in args.scenario or list(SCENARIOS):
        t = time.monotonic()
        print(f"# running {name} ...", flush=True)
        for r in run(name, args.pg_dsn, args.quick):
            results.append(r)
            print(r.report(), flush=True)
        print(f"  ({time.monotonic() - t:.0f} s)\n", flush=True)
    print(f"\nFault suite, {len(results)} scenarios in {time.monotonic() - started:.0f} s"
          f"{' (--quick)' if args.quick else ''}:\n")
    print(table(results))
    unmet = [(r.name, g.name) for r in results for g in r.unmet()]
    for scenario, goal in unmet:
        print(f"NOT MET: {scenario}: {goal}")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
