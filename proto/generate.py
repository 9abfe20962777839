"""Generate the Python code for every .proto under proto/ into the repository root.

Run from anywhere:  python proto/generate.py            (writes the files)
                    python proto/generate.py --out DIR  (writes elsewhere; the test compares)

The import path of each generated module follows the .proto's path below proto/,
so ``proto/rpcauthz/v1/options.proto`` becomes ``rpcauthz/v1/options_pb2.py``.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

_SERVICE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)
PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def proto_files() -> list[pathlib.Path]:
    """Every .proto below proto/, sorted so the output is stable."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    """Run protoc (from grpcio-tools) over every .proto, writing into ``out``."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    grpc_files = [f for f in files if _SERVICE.search((PROTO_ROOT / f).read_text())]
    out.mkdir(parents=True, exist_ok=True)
    base = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}"]
    if protoc.main(base + [f"--python_out={out}", f"--pyi_out={out}", *files]) != 0:
        raise SystemExit("protoc failed for the message code")
    if grpc_files and protoc.main(base + [f"--grpc_python_out={out}", *grpc_files]) != 0:
        raise SystemExit("protoc failed for the gRPC stubs")
    # Every folder that holds generated code must be a regular package.
    for py in out.rglob("*_pb2*.py"):
        for parent in py.relative_to(out).parents:
            if parent != pathlib.Path("."):
                (out / parent / "__init__.py").touch(exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT)
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
