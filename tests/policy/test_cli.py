"""`mpactl sync`, `mpactl grants`, `mpactl db` as an operator runs them (real subprocesses)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from policy import Grant, Role
from policy.grant_cache import GrantCache
from policy.stores import open_store
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CATALOG = Path(__file__).parent / "catalog"


def mpactl(*args: str, env_store: str | None = None) -> subprocess.CompletedProcess[str]:
    import os
    env = dict(os.environ)
    env.pop("RPCAUTHZ_STORE_URL", None)
    if env_store:
        env["RPCAUTHZ_STORE_URL"] = env_store
    return subprocess.run([sys.executable, "-m", "mpactl.app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_names_the_commands():
    out = mpactl("sync", "--help")
    assert out.returncode == 0, out.stderr
    for word in ("--store", "--catalog", "--oncall", "--dry-run", "RPCAUTHZ_STORE_URL"):
        assert word in out.stdout
    out = mpactl("grants", "--help")
    assert out.returncode == 0 and all(w in out.stdout for w in ("list", "add", "remove"))


def test_sync_dry_run_then_real_then_idempotent(backend, tmp_path):
    url = backend.url
    oncall = tmp_path / "oncall.yaml"
    oncall.write_text("security_oncall:\n  - principal: sec1@example.com\n    until: 2030-01-01T00:00:00Z\n")
    out = mpactl("sync", "--store", url, "--catalog", str(CATALOG), "--oncall", str(oncall), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "+ contributor asmith@example.com pay.v1.Payments  (sync:catalog)" in out.stdout
    assert "+ security_oncall sec1@example.com until 2030-01-01T00:00:00+00:00  (sync:oncall)" in out.stdout
    assert "sync:catalog: would add 12, would remove 0" in out.stdout
    assert "sync:oncall: would add 1, would remove 0" in out.stdout
    with open_store(url) as s:
        assert s.list_grants() == []
    out = mpactl("sync", "--store", url, "--catalog", str(CATALOG), "--oncall", str(oncall), "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["dry_run"] is True and set(data["sources"]) == {"sync:catalog", "sync:oncall"}
    assert len(data["sources"]["sync:catalog"]["added"]) == 12 and data["sources"]["sync:catalog"]["removed"] == []
    assert data["sources"]["sync:oncall"]["added"] == [{
        "principal": "sec1@example.com", "role": "security_oncall", "service": None,
        "expires_at": "2030-01-01T00:00:00+00:00", "source": "sync:oncall", "active": True}]
    with open_store(url) as s:
        assert s.list_grants() == []

    out = mpactl("sync", "--catalog", str(CATALOG), "--oncall", str(oncall), env_store=url)
    assert out.returncode == 0, out.stderr
    assert "sync:catalog: added 12, removed 0" in out.stdout
    with open_store(url) as s:
        assert len(s.list_grants()) == 13
        actors = {e.actor for e in s.list_audit(kinds=["grant.added"])}
        assert len(actors) == 1 and actors.pop().startswith("mpactl:")  # who ran the sync

    out = mpactl("sync", "--store", url, "--catalog", str(CATALOG))
    assert out.returncode == 0 and "sync:catalog: added 0, removed 0" in out.stdout
    assert "sync:oncall" not in out.stdout  # no --oncall: on-call grants left alone


def test_sync_refusals_exit_1_with_the_reason(tmp_path):
    url = f"sqlite://{tmp_path}/store.db"
    bad = tmp_path / "catalog"
    shutil.copytree(CATALOG, bad)
    (bad / "groups.yaml").write_text((bad / "groups.yaml").read_text() + "---\nkind: Group\nmetadata: [\n")
    out = mpactl("sync", "--store", url, "--catalog", str(bad))
    assert out.returncode == 1
    assert f"error: {bad / 'groups.yaml'}:" in out.stderr and "invalid YAML" in out.stderr

    out = mpactl("sync", "--store", url)
    assert out.returncode == 1 and "nothing to sync" in out.stderr

    out = mpactl("sync", "--store", "mysql://x@y/z", "--catalog", str(CATALOG))
    assert out.returncode == 2 and "error: unsupported store URL" in out.stderr  # bad usage

    out = mpactl("sync", "--catalog", str(CATALOG))
    assert out.returncode != 0 and "--store" in out.stderr  # no store given at all


def test_unreachable_store_exits_4():
    url = f"postgresql://app@127.0.0.1:{free_port()}/x"
    out = mpactl("grants", "list", "--store", url)
    assert out.returncode == 4
    assert "error: postgresql store" in out.stderr and "refused" in out.stderr.lower()


def test_grants_add_list_remove_and_db_init(tmp_path):
    url = f"sqlite://{tmp_path}/store.db"
    out = mpactl("db", "init", "--store", url)
    assert out.returncode == 0 and "schema version 3" in out.stdout, out.stderr
    assert mpactl("db", "init", "--store", url).returncode == 0  # again: harmless
    out = mpactl("db", "init", "--store", url, "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"store": url, "schema_version": 3}, out.stderr

    out = mpactl("grants", "add", "alice@example.com", "contributor", "--service", "pay.v1.Payments",
                 "--expires", "2030-01-01T00:00:00Z", "--store", url)
    assert out.returncode == 0, out.stderr
    out = mpactl("grants", "add", "bob@example.com", "engineer", "--store", url)
    assert out.returncode == 0, out.stderr
    out = mpactl("grants", "add", "audrey@example.com", "auditor", "--store", url)
    assert out.returncode == 0, out.stderr
    out = mpactl("grants", "list", "--store", url)
    assert out.stdout.splitlines() == [
        "contributor alice@example.com pay.v1.Payments until 2030-01-01T00:00:00+00:00  (manual)",
        "auditor audrey@example.com  (manual)",
        "engineer bob@example.com  (manual)"]
    assert mpactl("grants", "remove", "audrey@example.com", "auditor", "--store", url).returncode == 0
    out = mpactl("grants", "list", "--json", "--principal", "bob@example.com", "--store", url)
    assert '"principal": "bob@example.com"' in out.stdout and len(out.stdout.splitlines()) == 1

    for args, message in [
        (("grants", "add", "c@e.com", "contributor"), "needs the service"),
        (("grants", "add", "c@e.com", "wizard"), "wizard"),
        (("grants", "add", "c@e.com", "auditor", "--service", "pay.v1.Payments"),
         "an auditor grant is not scoped to a service"),
        (("grants", "add", "c@e.com", "engineer", "--expires", "2030-01-01T00:00:00"), "needs a timezone"),
        (("grants", "remove", "zed@example.com", "engineer"), "no engineer grant for zed@example.com"),
    ]:
        out = mpactl(*args, "--store", url)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)

    assert mpactl("grants", "remove", "bob@example.com", "engineer", "--store", url).returncode == 0
    with open_store(url) as s:
        assert [g.principal for g in s.list_grants()] == ["alice@example.com"]


def test_a_sync_reaches_a_running_grant_cache_within_seconds(backend):
    """The issue's "a grant change reaches the decision within seconds, not an hour"."""
    store = backend.open(poll_interval=0.2)
    now = datetime.now(UTC)
    with GrantCache(store, reload_interval=60, max_staleness=120) as cache:
        assert not cache.current().is_contributor("bwong@example.com", "pay.v1.Payments", now)
        started = time.monotonic()
        out = mpactl("sync", "--store", backend.url, "--catalog", str(CATALOG))
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 10
        while not cache.current().is_contributor("bwong@example.com", "pay.v1.Payments", now):
            assert time.monotonic() < deadline, "sync not seen by the running cache within 10 s"
            time.sleep(0.05)
        assert time.monotonic() - started < 15
        assert cache.current().is_engineer("sec1@example.com", now)
        assert Grant("jdoe@example.com", Role.CONTRIBUTOR, "ledger.v1.Ledger",
                     source="sync:catalog") in list(cache.current())
