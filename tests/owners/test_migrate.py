"""``mpactl migrate`` on a copy of a real public proto tree, non-interactively and errors."""
from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from policy import Mode
from tests.support.owners_support import REPO, run_mpactl, snapshot

OPS = "google/longrunning/operations_proto.proto"


def compile_with_system_protoc(root: Path, name: str, tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    """Compile with /usr/bin/protoc (a different protoc from the tool's), return the file's descriptor."""
    import grpc_tools
    out = tmp / "check.pb"
    subprocess.run(["protoc", f"-I{root}", f"-I{REPO / 'proto'}",
                    f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                    "--include_imports", f"--descriptor_set_out={out}", name],
                   check=True, capture_output=True, text=True)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return next(f for f in fds.file if f.name == name)


def modes_from_descriptor(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Mode | None]:
    """Read the option with the generated code of options.proto (independent of mpa's reader)."""
    from rpcauthz.v1 import options_pb2
    out = {}
    for svc in fd.service:
        for m in svc.method:
            opts = descriptor_pb2.MethodOptions.FromString(m.options.SerializeToString())
            out[m.name] = (Mode(opts.Extensions[options_pb2.humans_who_can_rpc])
                           if opts.HasExtension(options_pb2.humans_who_can_rpc) else None)
    return out


CHOSEN = {
    "ListOperations": Mode.ENGINEERS_WITHOUT_APPROVAL,
    "GetOperation": Mode.ENGINEERS_WITH_APPROVAL,
    "DeleteOperation": Mode.CONTRIBUTORS_WITH_APPROVAL,
    "CancelOperation": Mode.CONTRIBUTORS_WITHOUT_APPROVAL,
    "WaitOperation": Mode.BREAK_GLASS_ONLY,
}


def test_set_all_rpcs_real_tree_compiles_and_keeps_everything_else(gtree: Path, tmp_path: Path):
    path = gtree / OPS
    before = path.read_text()
    args = [f"--set={m}={mode.name}" for m, mode in CHOSEN.items()]
    res = run_mpactl("migrate", "google.longrunning.Operations", "--root", str(gtree), *args, "--yes")
    assert res.returncode == 0, res.stderr
    after = path.read_text()
    # The diff shown is the change made.
    assert f"--- a/{OPS}" in res.stdout and f"+++ b/{OPS}" in res.stdout
    assert '+import "rpcauthz/v1/options.proto";' in res.stdout
    # Compiles with an independent protoc, and every mode reads back as chosen.
    fd = compile_with_system_protoc(gtree, OPS, tmp_path)
    assert modes_from_descriptor(fd) == CHOSEN
    # Formatting and comments kept: only insertions, plus the one `{}` body opened up.
    sm = difflib.SequenceMatcher(a=before.splitlines(), b=after.splitlines(), autojunk=False)
    changes = [op for op in sm.get_opcodes() if op[0] != "equal"]
    assert all(op[0] in ("insert", "replace") for op in changes)
    replaced = [before.splitlines()[op[1]:op[2]] for op in changes if op[0] == "replace"]
    assert replaced == [["  rpc WaitOperation(WaitOperationRequest) returns (Operation) {}"]]
    assert "    option (rpcauthz.v1.humans_who_can_rpc) = BREAK_GLASS_ONLY;\n  }\n" in after
    assert after.count("humans_who_can_rpc") == 5
    # lint agrees the service is done (Locations still is not).
    lint = run_mpactl("lint", "--format", "json", str(gtree))
    assert "google.longrunning.Operations" not in lint.stdout


def test_second_run_updates_existing_options_never_duplicates(gtree: Path, tmp_path: Path):
    args = [f"--set={m}={mode.name}" for m, mode in CHOSEN.items()]
    assert run_mpactl("migrate", "Operations", "--root", str(gtree), *args, "--yes").returncode == 0
    once = (gtree / OPS).read_text()
    res = run_mpactl("migrate", "Operations", "--root", str(gtree),
                     "--set", "GetOperation=engineers_without_approval", "--yes")
    assert res.returncode == 0, res.stderr
    twice = (gtree / OPS).read_text()
    assert twice.count("humans_who_can_rpc") == 5
    assert twice.count("import \"rpcauthz/v1/options.proto\"") == 1
    diff = [ln for ln in difflib.unified_diff(once.splitlines(), twice.splitlines(), lineterm="", n=0)
            if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    assert diff == ["-    option (rpcauthz.v1.humans_who_can_rpc) = ENGINEERS_WITH_APPROVAL;",
                    "+    option (rpcauthz.v1.humans_who_can_rpc) = ENGINEERS_WITHOUT_APPROVAL;"]
    # --yes keeps existing method options (the default answer), so nothing else moved.
    assert modes_from_descriptor(compile_with_system_protoc(gtree, OPS, tmp_path))["WaitOperation"] is Mode.BREAK_GLASS_ONLY
    res = run_mpactl("migrate", "Operations", "--root", str(gtree), "--yes")
    assert res.returncode == 0 and "no changes" in res.stdout


SHORT = """\
// Ledger: tab-indented, no imports, bodiless RPCs.
syntax = "proto3";

package acme.ledger.v1;

message Req {
\tstring id = 1; // the entry
}

/* The ledger service. */
service Ledger {
\t// Reads one entry.
\trpc GetEntry(Req) returns (Req); // trailing comment stays
\trpc PurgeEntries(Req) returns (Req);
\trpc Frobnicate(Req) returns (Req) {
\t}
}
"""


def test_bodiless_rpcs_tabs_and_missing_import(tmp_path: Path):
    root = tmp_path / "repo"
    f = root / "acme/ledger/v1/ledger.proto"
    f.parent.mkdir(parents=True)
    f.write_text(SHORT)
    res = run_mpactl("migrate", "acme.ledger.v1.Ledger", "--root", str(root), "--yes")
    assert res.returncode == 0, res.stderr
    # Default answers are the suggestions: read-like (unused) / destructive / unclear.
    assert "GetEntry: BREAK_GLASS_ONLY (none set: gateway default) -> CONTRIBUTORS_WITHOUT_APPROVAL" in res.stdout
    assert "PurgeEntries: BREAK_GLASS_ONLY (none set: gateway default) -> BREAK_GLASS_ONLY" in res.stdout
    assert "Frobnicate: BREAK_GLASS_ONLY (none set: gateway default) -> CONTRIBUTORS_WITH_APPROVAL" in res.stdout
    assert f.read_text() == """\
// Ledger: tab-indented, no imports, bodiless RPCs.
syntax = "proto3";

package acme.ledger.v1;

import "rpcauthz/v1/options.proto";

message Req {
\tstring id = 1; // the entry
}

/* The ledger service. */
service Ledger {
\t// Reads one entry.
\trpc GetEntry(Req) returns (Req) {
\t\toption (rpcauthz.v1.humans_who_can_rpc) = CONTRIBUTORS_WITHOUT_APPROVAL;
\t} // trailing comment stays
\trpc PurgeEntries(Req) returns (Req) {
\t\toption (rpcauthz.v1.humans_who_can_rpc) = BREAK_GLASS_ONLY;
\t}
\trpc Frobnicate(Req) returns (Req) {
\t\toption (rpcauthz.v1.humans_who_can_rpc) = CONTRIBUTORS_WITH_APPROVAL;
\t}
}
"""
    fd = compile_with_system_protoc(root, "acme/ledger/v1/ledger.proto", tmp_path)
    assert modes_from_descriptor(fd)["PurgeEntries"] is Mode.BREAK_GLASS_ONLY


def test_dry_run_writes_nothing(gtree: Path):
    before = snapshot(gtree)
    res = run_mpactl("migrate", "Operations", "--root", str(gtree), "--yes", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "+    option (rpcauthz.v1.humans_who_can_rpc) = CONTRIBUTORS_WITH_APPROVAL;" in res.stdout
    assert snapshot(gtree) == before


@pytest.mark.parametrize("args, message", [
    (["NoSuchService"], "unknown service 'NoSuchService'"),
    (["google.nothere.Operations"], "unknown service 'google.nothere.Operations'"),
    (["Operations", "--set", "GetOperation=SUPERUSERS"], f"{OPS}:70: --set GetOperation: unknown humans_who_can_rpc mode 'SUPERUSERS'"),
    (["Operations", "--set", "GetOperation=HUMANS_WHO_CAN_RPC_UNSPECIFIED"], f"{OPS}:70: --set GetOperation: UNSPECIFIED"),
    (["Operations", "--set", "Frob=BREAK_GLASS_ONLY"], "has no rpc 'Frob'"),
    (["Operations", "--set", "GetOperation"], "expected Method=MODE"),
])
def test_refusals_name_what_is_wrong_and_change_nothing(gtree: Path, args, message):
    before = snapshot(gtree)
    res = run_mpactl("migrate", *args, "--root", str(gtree), "--yes")
    assert res.returncode == 2, res.stdout
    assert message in res.stderr
    assert snapshot(gtree) == before


def test_unparsable_proto_names_file_and_line(gtree: Path):
    path = gtree / OPS
    path.write_text(path.read_text().replace("rpc CancelOperation(CancelOperationRequest)",
                                             "rpc CancelOperation(CancelOperationRequest"))
    before = snapshot(gtree)
    res = run_mpactl("migrate", "Operations", "--root", str(gtree), "--yes")
    assert res.returncode == 2
    assert f"{path}:99:" in res.stderr, res.stderr
    assert snapshot(gtree) == before


def test_ambiguous_bare_name(gtree: Path):
    other = gtree / "acme/ops.proto"
    other.parent.mkdir(parents=True)
    other.write_text('syntax = "proto3";\npackage acme;\nmessage M {}\nservice Operations { rpc X(M) returns (M); }\n')
    res = run_mpactl("migrate", "Operations", "--root", str(gtree), "--yes")
    assert res.returncode == 2 and "ambiguous" in res.stderr
    assert "google.longrunning.Operations" in res.stderr and "acme.Operations" in res.stderr


def test_failed_rename_leaves_the_original_and_no_temp_file(tmp_path: Path, monkeypatch):
    from owners import migrate
    f = tmp_path / "x.proto"
    f.write_text("original\n")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        migrate.write_atomically(f, "new text\n")
    assert f.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.proto"]


def test_suggestion_heuristic():
    from owners.migrate import suggest
    from owners.usage import MethodUsage
    wide = MethodUsage("GetThing", calls=9)
    wide.by_engineer.update({"a": 3, "b": 3, "c": 3})
    assert suggest("GetThing", wide)[0] is Mode.ENGINEERS_WITHOUT_APPROVAL
    assert suggest("GetThing", MethodUsage("GetThing"))[0] is Mode.CONTRIBUTORS_WITHOUT_APPROVAL
    assert suggest("BatchGetThings", wide)[0] is Mode.ENGINEERS_WITHOUT_APPROVAL
    assert suggest("DeleteAccount")[0] is Mode.CONTRIBUTORS_WITH_APPROVAL
    assert suggest("EraseCustomerData", wide)[0] is Mode.BREAK_GLASS_ONLY
    assert suggest("HardPurge")[0] is Mode.BREAK_GLASS_ONLY
    assert suggest("Frobnicate")[0] is Mode.CONTRIBUTORS_WITH_APPROVAL


def test_crlf_line_endings_are_kept(tmp_path: Path):
    root = tmp_path / "repo"
    f = root / "acme/v1/crlf.proto"
    f.parent.mkdir(parents=True)
    src = ('syntax = "proto3";\r\npackage acme.v1;\r\nimport "google/protobuf/empty.proto";\r\n'
           "service Crlf {\r\n  // keep me\r\n  rpc GetIt(google.protobuf.Empty) returns (google.protobuf.Empty);\r\n}\r\n")
    f.write_bytes(src.encode())
    res = run_mpactl("migrate", "acme.v1.Crlf", "--root", str(root), "--set", "GetIt=ENGINEERS_WITH_APPROVAL", "--yes")
    assert res.returncode == 0, res.stderr
    data = f.read_bytes().decode()
    assert data.count("\r\n") == data.count("\n")  # no bare LF introduced
    assert data == ('syntax = "proto3";\r\npackage acme.v1;\r\nimport "google/protobuf/empty.proto";\r\n'
                    'import "rpcauthz/v1/options.proto";\r\n'
                    "service Crlf {\r\n  // keep me\r\n  rpc GetIt(google.protobuf.Empty) returns (google.protobuf.Empty) {\r\n"
                    "    option (rpcauthz.v1.humans_who_can_rpc) = ENGINEERS_WITH_APPROVAL;\r\n  }\r\n}\r\n")
