"""``mpactl usage`` and ``migrate --store`` reading real audit events from a real store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy.stores import open_store
from tests.support.owners_support import run_mpactl
from tests.support.owners_support import seed_usage as seed

SVC = "google.longrunning.Operations"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    try:
        seed(store)
    finally:
        store.close()
    return url


def test_usage_report(store_url: str, gtree: Path):
    res = run_mpactl("usage", SVC, "--store", store_url, "--root", str(gtree))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "  GetOperation: 6 calls by 3 engineers" in out
    assert "    alice: 3\n    bob: 2\n    carol: 1" in out
    assert "  DeleteOperation: 2 calls by 2 engineers" in out
    assert "    decided: approval_required 1, deny 1" in out
    assert "  ListOperations: no calls by hand in the window" in out
    # Only alice contributes: under CONTRIBUTORS_WITHOUT_APPROVAL 3 of 6 GetOperation calls pass.
    assert "    under CONTRIBUTORS_WITHOUT_APPROVAL: allow 3, deny 3" in out
    assert "dave" not in out and "erin" not in out


def test_usage_needs_a_reachable_store(tmp_path: Path):
    res = run_mpactl("usage", SVC)
    assert res.returncode == 2 and "--store" in res.stderr
    res = run_mpactl("usage", SVC, "--store", "mysql://nope")
    assert res.returncode == 2 and "cannot open store" in res.stderr


def test_migrate_shows_usage_and_suggests_from_it(store_url: str, gtree: Path):
    res = run_mpactl("migrate", "Operations", "--root", str(gtree), "--yes", "--dry-run",
                     env={"RPCAUTHZ_STORE_URL": store_url})
    assert res.returncode == 0, res.stderr
    # Widely used read -> open to engineers; a read nobody used stays with contributors.
    assert "rpc GetOperation: BREAK_GLASS_ONLY (none set: gateway default) -> ENGINEERS_WITHOUT_APPROVAL" in res.stdout
    assert "rpc ListOperations: BREAK_GLASS_ONLY (none set: gateway default) -> CONTRIBUTORS_WITHOUT_APPROVAL" in res.stdout


def test_usage_json(store_url: str, gtree: Path):
    res = run_mpactl("usage", SVC, "--store", store_url, "--root", str(gtree), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["service"] == SVC and data["days"] == 30
    rows = {m["method"]: m for m in data["methods"]}
    get = rows["GetOperation"]
    assert set(get) == {"method", "calls", "engineers", "outcomes", "last_call", "would_have"}
    assert get["calls"] == 6 and get["engineers"] == {"alice": 3, "bob": 2, "carol": 1}
    assert get["would_have"]["CONTRIBUTORS_WITHOUT_APPROVAL"] == {"allow": 3, "approval_required": 0, "deny": 3}
    assert rows["DeleteOperation"]["outcomes"] == {"approval_required": 1, "deny": 1}
    assert rows["ListOperations"]["calls"] == 0 and rows["ListOperations"]["would_have"] is None
    assert rows["ListOperations"]["last_call"] is None and get["last_call"].startswith("20")
