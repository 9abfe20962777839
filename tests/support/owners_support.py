"""Helpers for the service-owner tool tests: a real public proto tree, CLI runners."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # tests/support/x.py -> repo root


def googleapis_root() -> Path:
    """Where googleapis-common-protos installed its google/**/*.proto files."""
    spec = importlib.util.find_spec("google.longrunning")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("googleapis-common-protos is not installed (pip install -e '.[test]')")
    return Path(list(spec.submodule_search_locations)[0]).parent.parent  # .../site-packages


def copy_googleapis(tmp_path: Path) -> Path:
    """A copy of googleapis-common-protos' .proto files (google/api, longrunning, rpc, ...).

    google/protobuf/*.proto are left out on purpose: the tools must find the well-known
    types themselves, as they would for a service repository.
    """
    src = googleapis_root()
    root = tmp_path / "tree"
    for f in (src / "google").rglob("*.proto"):
        rel = f.relative_to(src)
        if rel.parts[1] == "protobuf":
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / rel)
    assert (root / "google/longrunning/operations_proto.proto").is_file()
    return root


def run_mpactl(*args: str, cwd: Path = REPO, input: str | None = None,
               env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this worktree's ``mpactl`` as a user would (a subprocess)."""
    full_env = {**os.environ, **(env or {})}
    if "RPCAUTHZ_STORE_URL" not in (env or {}):
        full_env.pop("RPCAUTHZ_STORE_URL", None)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "mpactl.app", *args], cwd=cwd,
                          capture_output=True, text=True, input=input, timeout=timeout,
                          env=full_env)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def descriptor_set_with_system_protoc(root: Path, names: list[str], out: Path):
    """Compile ``names`` under ``root`` with /usr/bin/protoc (not the tool's own protoc)."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    subprocess.run(["protoc", f"-I{root}", f"-I{REPO / 'proto'}",
                    f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                    "--include_imports", f"--descriptor_set_out={out}", *names],
                   check=True, capture_output=True, text=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class DescriptorServer:
    """A real gRPC server for services known only from a FileDescriptorSet, with reflection.

    Every method answers with an empty response message; reflection (grpcio-reflection's own
    servicer, v1alpha) serves the descriptors exactly as compiled.
    """

    def __init__(self, fds, services: list[str]) -> None:
        from concurrent import futures

        import grpc
        from google.protobuf import descriptor_pool, message_factory
        from grpc_reflection.v1alpha import reflection

        self.pool = descriptor_pool.DescriptorPool()
        for fd in fds.file:
            self.pool.Add(fd)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        for name in services:
            svc = self.pool.FindServiceByName(name)
            handlers = {}
            for m in svc.methods:
                req = message_factory.GetMessageClass(m.input_type)
                resp = message_factory.GetMessageClass(m.output_type)
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                    lambda request, context, resp=resp: resp(),
                    request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], self.server, pool=self.pool)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> DescriptorServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None).wait(5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def seed_usage(store, service: str = "google.longrunning.Operations") -> None:
    """Grants and decision audit events for ``service``: GetOperation used by 3 engineers."""
    from datetime import datetime, timedelta

    from policy import Grant, Role
    from policy.audit import AuditEvent

    now = datetime.now(UTC)
    for who in ("alice", "bob", "carol"):
        store.put_grant(Grant(who, Role.ENGINEER))
    store.put_grant(Grant("alice", Role.CONTRIBUTOR, service))
    calls = [("alice", "GetOperation", "decision.allow", 3), ("bob", "GetOperation", "decision.allow", 2),
             ("carol", "GetOperation", "decision.allow", 1), ("alice", "DeleteOperation", "decision.approval_required", 1),
             ("bob", "DeleteOperation", "decision.deny", 1)]
    for who, method, kind, n in calls:
        for i in range(n):
            store.append_audit(AuditEvent(kind=kind, actor=who, at=now - timedelta(hours=i + 1),
                                          service=service, method=method, outcome=kind.split(".")[1]))
    # Old and unrelated events must not count.
    store.append_audit(AuditEvent(kind="decision.allow", actor="dave", at=now - timedelta(days=90),
                                  service=service, method="GetOperation"))
    store.append_audit(AuditEvent(kind="decision.allow", actor="erin", at=now, service="other.v1.S",
                                  method="GetOperation"))


