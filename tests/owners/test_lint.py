"""``mpactl lint`` on a real public proto tree and on small hand-made cases."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.support.owners_support import REPO, run_mpactl

RPC_LINE = re.compile(r"^\s*rpc\s+(\w+)", re.MULTILINE)


def _rpcs_by_regex(root: Path) -> set[tuple[str, str]]:
    """(file, method) for each rpc in the tree, found independently of protoc."""
    out = set()
    for f in root.rglob("*.proto"):
        text = re.sub(r"//[^\n]*", "", f.read_text())  # examples in comments are not RPCs
        for m in RPC_LINE.finditer(text):
            out.add((str(f), m.group(1)))
    return out


def test_real_tree_every_rpc_reported_at_its_rpc_keyword(gtree: Path):
    res = run_mpactl("lint", str(gtree))
    assert res.returncode == 1, res.stderr
    findings = [ln for ln in res.stdout.splitlines() if ": error: " in ln]
    expected = _rpcs_by_regex(gtree)
    assert len(expected) >= 7  # Operations (5) + Locations (2)
    seen = set()
    for ln in findings:
        m = re.match(r"^(.+\.proto):(\d+):(\d+): error: rpc ([\w.]+)\.(\w+) has no humans_who_can_rpc", ln)
        assert m, ln
        path, line, col, service, method = m[1], int(m[2]), int(m[3]), m[4], m[5]
        source_line = Path(path).read_text().splitlines()[line - 1]
        assert source_line[col - 1:].startswith(f"rpc {method}("), (ln, source_line)
        assert "mpactl migrate " + service in ln
        seen.add((path, method))
    assert seen == expected
    assert f"{len(expected)} of {len(expected)} RPCs" in res.stdout


def test_json_format_and_service_default_satisfies(gtree: Path):
    loc = gtree / "google/cloud/location/locations.proto"
    text = loc.read_text()
    text = text.replace('import "google/protobuf/any.proto";',
                        'import "google/protobuf/any.proto";\nimport "rpcauthz/v1/options.proto";')
    text = text.replace("service Locations {",
                        "service Locations {\n  option (rpcauthz.v1.default_humans_who_can_rpc) = ENGINEERS_WITHOUT_APPROVAL;")
    loc.write_text(text)
    res = run_mpactl("lint", "--format", "json", str(gtree))
    assert res.returncode == 1
    data = json.loads(res.stdout)
    methods = {(f["service"], f["method"]) for f in data["findings"]}
    assert ("google.longrunning.Operations", "GetOperation") in methods
    assert not any(s == "google.cloud.location.Locations" for s, _ in methods)
    assert data["error"] is None and data["rpcs"] >= 7


def test_clean_files_exit_zero_and_demo_protos_pass():
    # Ledger: a service default covers the RPCs without their own option.
    res = run_mpactl("lint", str(REPO / "proto/rpcauthz/demo/v1/ledger.proto"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: all 3 RPCs in 1 files" in res.stdout
    # The accounts demo leaves Ping without an option on purpose, with a reviewed suppression:
    # no error, one note naming it and the reason.
    res = run_mpactl("lint", "-I", str(REPO / "proto"), str(REPO / "proto/rpcauthz/demo/v1/accounts.proto"))
    assert res.returncode == 0, res.stdout
    assert not [ln for ln in res.stdout.splitlines() if ": error: " in ln]
    notes = [ln for ln in res.stdout.splitlines() if ": note: " in ln]
    assert len(notes) == 1 and "rpcauthz.demo.v1.Accounts.Ping suppressed: the demo shows" in notes[0]


def test_all_declared_is_ok(tmp_path: Path):
    f = tmp_path / "ok.proto"
    f.write_text('syntax = "proto3";\npackage ok.v1;\nimport "rpcauthz/v1/options.proto";\n'
                 "message M {}\nservice S {\n"
                 "  rpc A(M) returns (M) { option (rpcauthz.v1.humans_who_can_rpc) = BREAK_GLASS_ONLY; }\n"
                 "}\n")
    res = run_mpactl("lint", str(f))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: all 1 RPCs" in res.stdout


def test_explicit_unspecified_is_a_finding(tmp_path: Path):
    f = tmp_path / "u.proto"
    f.write_text('syntax = "proto3";\npackage u.v1;\nimport "rpcauthz/v1/options.proto";\n'
                 "message M {}\nservice S {\n"
                 "  rpc A(M) returns (M) { option (rpcauthz.v1.humans_who_can_rpc) = HUMANS_WHO_CAN_RPC_UNSPECIFIED; }\n"
                 "}\n")
    res = run_mpactl("lint", str(f))
    assert res.returncode == 1
    assert f"{f}:6:3: error: rpc u.v1.S.A sets humans_who_can_rpc to HUMANS_WHO_CAN_RPC_UNSPECIFIED" in res.stdout


def test_unparsable_proto_names_file_and_line_exit_2(gtree: Path):
    ops = gtree / "google/longrunning/operations_proto.proto"
    lines = ops.read_text().splitlines(keepends=True)
    idx = next(i for i, ln in enumerate(lines) if "rpc GetOperation(" in ln)
    lines[idx] = lines[idx].replace("returns (Operation)", "returns Operation)")
    ops.write_text("".join(lines))
    res = run_mpactl("lint", str(gtree))
    assert res.returncode == 2
    assert f"{ops}:{idx + 1}:" in res.stderr, res.stderr
    assert "error:" in res.stderr
    res = run_mpactl("lint", "--format", "json", str(gtree))
    assert res.returncode == 2
    assert f"{ops}:{idx + 1}:" in json.loads(res.stdout)["error"]


def test_missing_import_is_a_clear_error(tmp_path: Path):
    f = tmp_path / "imp.proto"
    f.write_text('syntax = "proto3";\nimport "nowhere/missing.proto";\n')
    res = run_mpactl("lint", str(f))
    assert res.returncode == 2
    assert "nowhere/missing.proto" in res.stderr


def test_missing_path_and_bad_format(tmp_path: Path):
    res = run_mpactl("lint", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no such file or directory" in res.stderr
    (tmp_path / "README.md").write_text("# not a proto\n")
    res = run_mpactl("lint", str(tmp_path / "README.md"))
    assert res.returncode == 2 and "README.md: not a .proto file" in res.stderr
    assert "Expected top-level statement" not in res.stderr  # not parsed as one
    res = run_mpactl("lint", "--format", "xml", str(tmp_path))
    assert res.returncode == 2 and "--format" in res.stderr


def test_vendored_copy_recognised_by_full_name(tmp_path: Path):
    """A service repo that vendors the options file under its own path still passes lint."""
    vendored = tmp_path / "third_party/authz/humans.proto"
    vendored.parent.mkdir(parents=True)
    shutil.copyfile(REPO / "proto/rpcauthz/v1/options.proto", vendored)
    # A newer vendored copy may know a value we do not: that must not count as declared.
    text = vendored.read_text().replace("BREAK_GLASS_ONLY = 5;", "BREAK_GLASS_ONLY = 5;\n  ROBOTS_ONLY = 9;")
    vendored.write_text(text)
    svc = tmp_path / "svc/v1/svc.proto"
    svc.parent.mkdir(parents=True)
    svc.write_text('syntax = "proto3";\npackage svc.v1;\nimport "third_party/authz/humans.proto";\n'
                   "message M {}\nservice Svc {\n"
                   "  rpc Known(M) returns (M) { option (rpcauthz.v1.humans_who_can_rpc) = CONTRIBUTORS_WITH_APPROVAL; }\n"
                   "  rpc Newer(M) returns (M) { option (rpcauthz.v1.humans_who_can_rpc) = ROBOTS_ONLY; }\n"
                   "}\n")
    res = run_mpactl("lint", "-I", str(tmp_path), str(svc), "--format", "json")
    data = json.loads(res.stdout)
    assert res.returncode == 1, res.stdout
    assert [(f["method"], f["code"]) for f in data["findings"]] == [("Newer", "bad-value")]


def test_single_file_finds_its_import_root_from_its_package(gtree: Path):
    """Given one googleapis file and no -I, its imports (google/api/...) still resolve."""
    res = run_mpactl("lint", str(gtree / "google/longrunning/operations_proto.proto"))
    assert res.returncode == 1, res.stderr
    assert res.stdout.count(": error: ") == 5


def test_paths_with_spaces(tmp_path: Path):
    d = tmp_path / "my protos" / "a b"
    d.mkdir(parents=True)
    (d / "s.proto").write_text('syntax = "proto3";\npackage s;\nmessage M {}\nservice S { rpc A(M) returns (M); }\n')
    res = run_mpactl("lint", str(tmp_path / "my protos"))
    assert res.returncode == 1, res.stderr
    assert f"{d / 's.proto'}:4:13: error: rpc s.S.A" in res.stdout


def test_options_file_found_without_the_repository_proto_folder(tmp_path: Path, monkeypatch):
    """Installed from a wheel there is no proto/ folder: the compiled-in descriptor is used."""
    from owners import proto_source
    monkeypatch.setattr(proto_source, "options_include", lambda: None)
    f = tmp_path / "svc.proto"
    f.write_text('syntax = "proto3";\npackage w.v1;\nimport "rpcauthz/v1/options.proto";\nmessage M {}\n'
                 "service S {\n  rpc A(M) returns (M) { option (rpcauthz.v1.humans_who_can_rpc) = BREAK_GLASS_ONLY; }\n"
                 "  rpc B(M) returns (M);\n}\n")
    tree = proto_source.compile_protos([f])
    modes = {r.method: r.method_mode for r in tree.rpcs()}
    from policy import Mode
    assert modes == {"A": Mode.BREAK_GLASS_ONLY, "B": None}


def test_json_flag_is_format_json(tmp_path: Path):
    """``mpactl lint --json`` prints exactly what ``--format json`` prints, with the same exit status."""
    f = tmp_path / "svc.proto"
    f.write_text('syntax = "proto3";\npackage t.v1;\nmessage M {}\nservice S {\n  rpc Do(M) returns (M);\n}\n')
    a, b = run_mpactl("lint", "--json", str(f)), run_mpactl("lint", "--format", "json", str(f))
    assert (a.returncode, b.returncode) == (1, 1), a.stderr + b.stderr
    assert a.stdout == b.stdout
    data = json.loads(a.stdout)
    assert set(data) >= {"files", "rpcs", "error", "findings"} and data["error"] is None
    assert [(x["service"], x["method"], x["code"], x["line"]) for x in data["findings"]] == [
        ("t.v1.S", "Do", "missing-option", 5)]
