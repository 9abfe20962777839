"""Reproducible broker builds, and two approvers with matching hashes to change the trusted one."""
from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclave_bridge import measure as m
from policy import AlreadyDecided, InvalidRequest, NotEligible, RequestClosed

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SEC = frozenset({"sam@example.com", "sue@example.com", "sid@example.com"})


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


H1, H2 = "a" * 96, "b" * 96
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_two_matching_reports_accept_the_measurement():
    p = m.propose(proposal_id="mp-1", commit=COMMIT, proposer="dev@example.com", reason="release 42", now=NOW)
    p = m.report(p, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    assert p.state is m.ProposalState.OPEN and p.measurement is None
    p = m.report(p, approver="sue@example.com", sha384_hex=H1.upper(), approvers=SEC, now=NOW)
    assert p.state is m.ProposalState.ACCEPTED and p.measurement == H1


def test_mismatching_hash_disputes_the_proposal_for_good():
    p = m.propose(proposal_id="mp-1", commit=COMMIT, proposer="dev@example.com", reason="r", now=NOW)
    p = m.report(p, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    p = m.report(p, approver="sue@example.com", sha384_hex=H2, approvers=SEC, now=NOW)
    assert p.state is m.ProposalState.DISPUTED and p.measurement is None
    with pytest.raises(RequestClosed, match="disputed"):
        m.report(p, approver="sid@example.com", sha384_hex=H1, approvers=SEC, now=NOW)


def test_report_refusals():
    p = m.propose(proposal_id="mp-1", commit=COMMIT, proposer="dev@example.com", reason="r", now=NOW)
    with pytest.raises(NotEligible, match="not a measurement approver"):
        m.report(p, approver="dev@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    p = m.report(p, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    with pytest.raises(AlreadyDecided, match="already reported"):
        m.report(p, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    with pytest.raises(InvalidRequest, match="SHA-384"):
        m.report(p, approver="sue@example.com", sha384_hex="abc", approvers=SEC, now=NOW)
    with pytest.raises(InvalidRequest, match="40-hex"):
        m.propose(proposal_id="x", commit="HEAD", proposer="d", reason="r", now=NOW)
    with pytest.raises(InvalidRequest, match="two approvers"):
        m.propose(proposal_id="x", commit=COMMIT, proposer="d", reason="r", now=NOW, required=1)


def test_ledger_changes_trusted_measurement_only_on_agreement(tmp_path):
    ledger = m.MeasurementLedger(tmp_path / "trust.json")
    p = ledger.propose(commit=COMMIT, proposer="dev@example.com", reason="release", now=NOW)
    ledger.report(p.id, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    assert ledger.trusted() is None
    with pytest.raises(AlreadyDecided):
        ledger.report(p.id, approver="sam@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    ledger.report(p.id, approver="sue@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    assert ledger.trusted() == {"sha384": H1, "commit": COMMIT, "proposal": p.id,
                                "approvers": ["sam@example.com", "sue@example.com"]}
    q = ledger.propose(commit=COMMIT, proposer="dev@example.com", reason="bad", now=NOW)
    ledger.report(q.id, approver="sam@example.com", sha384_hex=H2, approvers=SEC, now=NOW)
    ledger.report(q.id, approver="sue@example.com", sha384_hex=H1, approvers=SEC, now=NOW)
    assert m.MeasurementLedger(tmp_path / "trust.json").trusted()["sha384"] == H1  # unchanged
    assert ledger.get(q.id).state is m.ProposalState.DISPUTED


def mpactl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import sys
    return subprocess.run([sys.executable, "-m", "mpactl.app", "broker", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_measure_and_two_person_trust_change(repo, tmp_path):
    import json
    first = json.loads(mpactl("measure", "--repo", str(repo), "--json", cwd=tmp_path).stdout)
    second = json.loads(mpactl("measure", "--repo", str(repo), "--json", cwd=tmp_path).stdout)
    assert first == second
    ledger = str(tmp_path / "trust.json")
    approvers = "sam@example.com,sue@example.com"
    r = mpactl("trust", "propose", "--repo", str(repo), "--commit", "HEAD", "--reason", "release",
               "--as", "dev@example.com", "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pid = r.stdout.split()[0]
    r = mpactl("trust", "report", pid, "--as", "sam@example.com", "--approvers", approvers, "--repo", str(repo),
               "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 0 and "open (1/2" in r.stdout, r.stderr
    assert "no trusted measurement" in mpactl("trust", "show", "--ledger", ledger, cwd=tmp_path).stdout
    r = mpactl("trust", "show", "--ledger", ledger, "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) is None, r.stderr
    r = mpactl("trust", "report", pid, "--as", "sue@example.com", "--approvers", "sue@example.com",
               "--repo", str(repo), "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 2 and "error: --approvers must name at least two" in r.stderr
    r = mpactl("trust", "report", pid, "--as", "sam@example.com", "--approvers", approvers, "--repo", str(repo),
               "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 1 and "already reported" in r.stderr
    r = mpactl("trust", "report", pid, "--as", "sue@example.com", "--approvers", approvers, "--repo", str(repo),
               "--ledger", ledger, cwd=tmp_path)
    assert r.returncode == 0 and "accepted" in r.stdout, r.stderr
    trusted = json.loads(mpactl("trust", "show", "--ledger", ledger, cwd=tmp_path).stdout)
    assert trusted["sha384"] == first["sha384"] and trusted["commit"] == first["commit"]
    assert json.loads(mpactl("trust", "show", "--ledger", ledger, "--json", cwd=tmp_path).stdout) == trusted
    assert set(first) == {"commit", "sha384", "size"}


def test_cli_report_of_a_different_hash_exits_with_conflict(repo, tmp_path):
    """Two approvers' builds disagree: `trust report` says so and exits 6 (ExitCode.CONFLICT)."""
    ledger = tmp_path / "trust.json"
    led = m.MeasurementLedger(ledger)
    p = led.propose(commit=m.resolve_commit(repo, "HEAD"), proposer="dev@example.com", reason="release",
                    now=datetime.now(UTC))
    led.report(p.id, approver="sam@example.com", sha384_hex="a" * 96, approvers=SEC, now=datetime.now(UTC))
    r = mpactl("trust", "report", p.id, "--as", "sue@example.com", "--approvers", ",".join(sorted(SEC)),
               "--repo", str(repo), "--ledger", str(ledger), cwd=tmp_path)
    assert r.returncode == 6, r.stdout + r.stderr
    assert "disputed" in r.stdout and "error: hashes differ between approvers" in r.stderr
    assert led.get(p.id).state is m.ProposalState.DISPUTED and led.trusted() is None
