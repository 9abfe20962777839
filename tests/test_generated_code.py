"""The committed generated code matches what proto/generate.py produces now."""
import filecmp
import pathlib
import subprocess
import sys

from policy import Mode
from rpcauthz.v1 import options_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
                   check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "generate.py produced nothing"
    # generate.py only makes sure packages exist; a package's own __init__.py may have content.
    stale = [str(p) for p in fresh
             if not (ROOT / p).exists()
             or (p.name != "__init__.py" and not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False))]
    assert not stale, f"regenerate with `python proto/generate.py`; out of date: {stale}"


def test_option_numbers_are_the_pinned_ones():
    assert options_pb2.humans_who_can_rpc.number == 51234
    assert options_pb2.default_humans_who_can_rpc.number == 51235
    assert options_pb2.humans_who_can_rpc.full_name == "rpcauthz.v1.humans_who_can_rpc"
    assert options_pb2.default_humans_who_can_rpc.full_name == "rpcauthz.v1.default_humans_who_can_rpc"


def test_policy_mode_mirrors_the_proto_enum():
    proto = {v.name: v.number for v in options_pb2.HumansWhoCanRpc.DESCRIPTOR.values}
    ours = {("HUMANS_WHO_CAN_RPC_UNSPECIFIED" if m is Mode.UNSPECIFIED else m.name): m.value
            for m in Mode}
    assert proto == ours
