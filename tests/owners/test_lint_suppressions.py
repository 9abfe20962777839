"""`mpactl lint` suppressions (issue 10, finding 7): a reviewed finding is accepted with a reason
in a comment, shown in text and `--format json`; a suppression without a reason is itself a
finding; the project's own protos pass (with reviewed suppressions)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.support.owners_support import REPO, run_mpactl

HEAD = 'syntax = "proto3";\npackage acme.v1;\nimport "rpcauthz/v1/options.proto";\nmessage M {}\n'


def lint(tmp_path: Path, body: str, *extra: str):
    (tmp_path / "acme.proto").write_text(HEAD + body)
    return run_mpactl("lint", str(tmp_path), *extra, cwd=tmp_path)


def test_a_reasoned_suppression_accepts_the_finding_and_shows_in_json(tmp_path):
    res = lint(tmp_path, "service S {\n"
                         "  // mpactl-lint: allow missing-option: health probe for the load balancer\n"
                         "  rpc Probe(M) returns (M);\n"
                         "  rpc Open(M) returns (M);\n}\n", "--format", "json")
    assert res.returncode == 1, res.stdout + res.stderr  # Open still fails
    report = json.loads(res.stdout)
    assert [f["method"] for f in report["findings"]] == ["Open"]
    assert report["suppressed"] == [{
        "file": str(tmp_path / "acme.proto"), "line": 7, "column": 3, "service": "acme.v1.S",
        "method": "Probe", "code": "missing-option", "message": report["suppressed"][0]["message"],
        "reason": "health probe for the load balancer"}]


def test_a_service_level_suppression_covers_its_rpcs_and_text_lists_it(tmp_path):
    res = lint(tmp_path, "// mpactl-lint: allow missing-option: served through TLS passthrough\n"
                         "service S {\n  rpc A(M) returns (M);\n  rpc B(M) returns (M);\n}\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("suppressed: served through TLS passthrough") == 2
    assert "2 findings accepted with a reason" in res.stdout


def test_a_suppression_without_a_reason_is_a_finding(tmp_path):
    for comment in ("// mpactl-lint: allow missing-option", "// mpactl-lint: allow missing-option: ok"):
        res = lint(tmp_path, f"service S {{\n  {comment}\n  rpc A(M) returns (M);\n}}\n",
                   "--format", "json")
        assert res.returncode == 1
        (f,) = json.loads(res.stdout)["findings"]
        assert f["code"] == "suppression-without-reason" and f["line"] == 6
        assert "gives no reason" in f["message"]


def test_the_projects_own_protos_pass_lint():
    res = run_mpactl("lint", "proto", "--format", "json", cwd=REPO)
    assert res.returncode == 0, res.stdout
    report = json.loads(res.stdout)
    assert report["findings"] == [] and report["rpcs"] >= 15
    assert all(len(s["reason"]) >= 10 for s in report["suppressed"])
