"""``mpactl migrate`` driven through a real terminal (pexpect spawns it on a pty)."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect

from tests.support.owners_support import REPO, snapshot

OPS = "google/longrunning/operations_proto.proto"


def spawn(*args: str, env: dict | None = None) -> pexpect.spawn:
    e = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    if "RPCAUTHZ_STORE_URL" not in (env or {}):
        e.pop("RPCAUTHZ_STORE_URL", None)
    return pexpect.spawn(sys.executable, ["-m", "mpactl.app", *args], cwd=str(REPO),
                         env=e, encoding="utf-8", timeout=60, dimensions=(50, 200))


@contextlib.contextmanager
def session(*args: str, env: dict | None = None) -> Iterator[pexpect.spawn]:
    """``spawn`` for the length of a with-block; the child is always closed (its exit status is
    then in ``child.exitstatus``)."""
    child = spawn(*args, env=env)
    try:
        yield child
    finally:
        child.close(force=True)


def test_interactive_walk_choices_default_retry_and_confirm(gtree: Path):
    with session("migrate", "Operations", "--root", str(gtree)) as child:
        child.expect(r"\[1/5\] rpc ListOperations")
        child.expect(r"current:\s+BREAK_GLASS_ONLY \(none set: gateway default\)")
        child.expect(r"suggested: CONTRIBUTORS_WITHOUT_APPROVAL")
        child.expect(r"\(default 3\): ")
        child.sendline("1")                        # by number
        child.expect(r"\[2/5\] rpc GetOperation")
        child.expect(r"\(default 3\): ")
        child.sendline("")                         # Enter takes the suggestion
        child.expect(r"\[3/5\] rpc DeleteOperation")
        child.expect(r"\(default 4\): ")
        child.sendline("SUPERUSER")                # not a choice: asked again
        child.expect(r"'SUPERUSER' is not a choice")
        child.expect(r"\(default 4\): ")
        child.sendline("break_glass_only")         # by name, any case
        child.expect(r"\[4/5\] rpc CancelOperation")
        child.expect(r"\(default 4\): ")
        child.sendline("k")                        # keep as it is
        child.expect(r"\[5/5\] rpc WaitOperation")
        child.expect(r"\(default 3\): ")
        child.sendline("2")
        child.expect(r"write 4 change\(s\) to .*operations_proto\.proto\? \[Y/n\] ")
        child.sendline("y")
        child.expect(r"\+    option \(rpcauthz.v1.humans_who_can_rpc\) = ENGINEERS_WITH_APPROVAL;")
        child.expect(r"wrote .*operations_proto\.proto")
        child.expect(pexpect.EOF)
    assert child.exitstatus == 0
    text = (gtree / OPS).read_text()
    from owners.proto_source import compile_protos
    modes = {r.method: r.method_mode and r.method_mode.name
             for r in compile_protos([gtree / OPS], [gtree]).rpcs()}
    assert modes == {"ListOperations": "ENGINEERS_WITHOUT_APPROVAL",
                     "GetOperation": "CONTRIBUTORS_WITHOUT_APPROVAL",
                     "DeleteOperation": "BREAK_GLASS_ONLY",
                     "CancelOperation": None,
                     "WaitOperation": "ENGINEERS_WITH_APPROVAL"}
    assert text.count("humans_who_can_rpc") == 4


def test_quit_and_declined_confirmation_write_nothing(gtree: Path):
    before = snapshot(gtree)
    with session("migrate", "Operations", "--root", str(gtree)) as child:
        child.expect(r"\(default 3\): ")
        child.sendline("1")
        child.expect(r"\[2/5\]")
        child.expect(r": $")
        child.sendline("q")
        child.expect("quit: nothing written")
        child.expect(pexpect.EOF)
    assert child.exitstatus == 1
    assert snapshot(gtree) == before

    with session("migrate", "Operations", "--root", str(gtree), "--set", "GetOperation=BREAK_GLASS_ONLY") as child:
        for _ in range(4):  # the four RPCs not preset
            child.expect(r"\[1-5, k, q to quit\] \(default \w\): ")
            child.sendline("k")
        child.expect(r"write 1 change\(s\) to .*\? \[Y/n\] ")
        child.sendline("n")
        child.expect("nothing written")
        child.expect(pexpect.EOF)
    assert child.exitstatus == 1
    assert snapshot(gtree) == before


def test_interactive_shows_usage_from_the_store(gtree: Path, tmp_path: Path):
    from policy.stores import open_store
    from tests.support.owners_support import seed_usage

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    try:
        seed_usage(store)
    finally:
        store.close()
    with session("migrate", "Operations", "--root", str(gtree), env={"RPCAUTHZ_STORE_URL": url}) as child:
        child.expect(r"\[1/5\] rpc ListOperations")
        child.expect(r"usage:\s+no calls by hand in the window")
        child.expect(r"\(default 3\): ")
        child.sendline("")
        child.expect(r"\[2/5\] rpc GetOperation")
        child.expect(r"usage:\s+6 calls by 3 engineers, last \d{4}-\d\d-\d\d \d\d:\d\d UTC")
        child.expect(r"suggested: ENGINEERS_WITHOUT_APPROVAL \('get' reads, and 3 engineers used it\)")
        # The impact of each choice on those 6 calls (only alice, 3 calls, contributes).
        child.expect(r"1\) ENGINEERS_WITHOUT_APPROVAL +6 allowed\r?\n")
        child.expect(r"2\) ENGINEERS_WITH_APPROVAL +6 need approval\r?\n")
        child.expect(r"3\) CONTRIBUTORS_WITHOUT_APPROVAL +3 allowed, 3 denied\r?\n")
        child.expect(r"4\) CONTRIBUTORS_WITH_APPROVAL +3 need approval, 3 denied\r?\n")
        child.expect(r"5\) BREAK_GLASS_ONLY +6 denied\r?\n")
        child.expect(r"\(default 1\): ")
        child.sendline("")
        child.expect(r"\[3/5\] rpc DeleteOperation")
        child.expect(r"usage:\s+2 calls by 2 engineers")
        child.expect(r": $")
        child.sendline("q")
        child.expect("quit: nothing written")
        child.expect(pexpect.EOF)
    assert child.exitstatus == 1
