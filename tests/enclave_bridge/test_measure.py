"""Reproducible broker builds (the trust change itself: test_trust.py, test_trust_change.py)."""
from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from enclave_bridge import measure as m

ROOT = Path(__file__).resolve().parents[2]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin"}).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "enclave_bridge").mkdir(parents=True)
    (r / "policy").mkdir()
    (r / "docs").mkdir()
    (r / "enclave_bridge" / "broker.py").write_text("print('broker')\n")
    (r / "enclave_bridge" / "run.sh").write_text("#!/bin/sh\n")
    (r / "enclave_bridge" / "run.sh").chmod(0o755)
    (r / "policy" / "rules.py").write_text("RULES = 1\n")
    (r / "pyproject.toml").write_text("[project]\nname='x'\n")
    (r / "docs" / "readme.md").write_text("not in the artifact\n")
    git(r, "init", "-q")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "one")
    return r


def test_two_independent_builds_agree(repo):
    a = m.measure(repo, "HEAD")
    b = m.measure(repo, "HEAD")
    assert a == b and len(a.sha384) == 96 and a.commit == git(repo, "rev-parse", "HEAD")


def test_artifact_contents_are_pinned(repo, tmp_path):
    out = tmp_path / "broker.tar"
    got = m.measure(repo, "HEAD", out=out)
    data = out.read_bytes()
    assert hashlib.sha384(data).hexdigest() == got.sha384
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [t.name for t in members] == ["enclave_bridge/broker.py", "enclave_bridge/run.sh",
                                         "policy/rules.py", "pyproject.toml"]
    assert {(t.mtime, t.uid, t.gid, t.uname, t.gname) for t in members} == {(m.FIXED_MTIME, 0, 0, "", "")}
    assert {t.name: t.mode for t in members}["enclave_bridge/run.sh"] == 0o755
    assert {t.name: t.mode for t in members}["policy/rules.py"] == 0o644


def test_untracked_and_unrelated_files_do_not_change_the_hash(repo):
    before = m.measure(repo).sha384
    (repo / "enclave_bridge" / "stray.py").write_text("x = 1\n")   # untracked
    (repo / "docs" / "readme.md").write_text("changed\n")
    git(repo, "commit", "-qam", "docs only")
    assert m.measure(repo).sha384 == before


def test_a_code_change_changes_the_hash(repo):
    before = m.measure(repo)
    (repo / "policy" / "rules.py").write_text("RULES = 2\n")
    git(repo, "commit", "-qam", "change rules")
    after = m.measure(repo)
    assert after.sha384 != before.sha384
    assert m.measure(repo, before.commit).sha384 == before.sha384  # old commit still reproduces


def test_disagreeing_builds_are_refused(repo, monkeypatch):
    monkeypatch.setattr(m, "build_from_checkout", lambda checkout: b"something else")
    with pytest.raises(m.BuildError, match="not reproducible"):
        m.measure(repo)


def test_bad_revision_is_refused(repo):
    with pytest.raises(m.BuildError, match="rev-parse"):
        m.measure(repo, "no-such-branch")


def test_this_repository_builds_reproducibly():
    a = m.measure(ROOT, "HEAD")
    assert a == m.measure(ROOT, "HEAD") and a.size > 10_000


def mpactl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import sys
    return subprocess.run([sys.executable, "-m", "mpactl.app", "broker", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_measure_is_reproducible(repo, tmp_path):
    import json
    first = json.loads(mpactl("measure", "--repo", str(repo), "--json", cwd=tmp_path).stdout)
    second = json.loads(mpactl("measure", "--repo", str(repo), "--json", cwd=tmp_path).stdout)
    assert first == second and first["commit"] == git(repo, "rev-parse", "HEAD")


def test_the_old_self_asserted_trust_path_is_gone(tmp_path):
    # Issue 11: `trust report --as X --approvers FILE` let one person be both approvers.
    r = mpactl("trust", "report", "mp-1", "--as", "sam@example.com", "--approvers", "a,b", cwd=tmp_path)
    assert r.returncode == 2 and "No such command 'report'" in r.stderr


def test_cli_trust_show_without_a_trusted_measurement(tmp_path):
    import json
    ledger = str(tmp_path / "trust.json")
    r = mpactl("trust", "show", "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 0 and "no trusted measurement yet" in r.stdout, r.stderr
    r = mpactl("trust", "show", "--ledger", ledger, "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) is None, r.stderr
