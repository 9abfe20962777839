"""`mpactl migrate SERVICE` from a fresh checkout's root with the default `--root .` (issue 10,
finding 7): it finds proto/rpcauthz/demo/v1/ledger.proto, checks the edit compiles (no
"shadowed in the --proto_path") and, without a store, says "no usage data" rather than claiming
nobody called."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.owners_support import REPO, run_mpactl, snapshot


def fresh_checkout(tmp_path: Path) -> Path:
    """A copy of the repository's tracked proto files (what `git clone` gives)."""
    out = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "proto"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, out / name)
    return out


def test_migrate_with_default_root_from_checkout_root(tmp_path):
    root = fresh_checkout(tmp_path)
    before = snapshot(root)
    res = run_mpactl("migrate", "rpcauthz.demo.v1.Ledger", "--dry-run", "--yes",
                     "--set", "WatchEntries=CONTRIBUTORS_WITHOUT_APPROVAL", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shadowed" not in res.stderr
    assert "+    option (rpcauthz.v1.humans_who_can_rpc) = CONTRIBUTORS_WITHOUT_APPROVAL;" in res.stdout
    assert "proto/rpcauthz/demo/v1/ledger.proto" in res.stdout
    assert snapshot(root) == before  # dry run

    written = run_mpactl("migrate", "Ledger", "--yes",
                         "--set", "WatchEntries=CONTRIBUTORS_WITHOUT_APPROVAL", cwd=root)
    assert written.returncode == 0, written.stdout + written.stderr
    assert "CONTRIBUTORS_WITHOUT_APPROVAL" in (root / "proto/rpcauthz/demo/v1/ledger.proto").read_text()


def test_without_a_store_it_says_no_usage_data(tmp_path):
    root = fresh_checkout(tmp_path)
    res = run_mpactl("migrate", "Ledger", "--dry-run", cwd=root, input="k\nk\nk\n",
                     env={"RPCAUTHZ_STORE_URL": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no calls by hand" not in res.stdout
    assert res.stdout.count("usage:     no usage data") == 3
    assert "'watch' reads; no usage data" in res.stdout
