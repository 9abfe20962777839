"""Real gRPC reflection servers for the reflection tests, with knobs to misbehave.

Test protos live in tests/reflection_cache/protos and are compiled with protoc (grpcio-tools) into
FileDescriptorProtos; each server gets a private descriptor pool holding exactly one scenario's
files, so a vendored copy of options.proto and the real one never meet.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import pathlib
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from reflection_cache.server import ReflectionServicer, add_servicer

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEST_PROTOS = ROOT / "tests" / "reflection_cache" / "protos"


@functools.cache
def compile_proto(path: str) -> tuple[descriptor_pb2.FileDescriptorProto, ...]:
    """``path`` (below tests/reflection_cache/protos, or proto/) and its imports, imports first."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        rc = protoc.main(["protoc", f"-I{TEST_PROTOS}", f"-I{ROOT / 'proto'}", f"-I{well_known}",
                          "--include_imports", f"--descriptor_set_out={out}", path])
        assert rc == 0, f"protoc failed for {path}"
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return tuple(fds.file)


def pool_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A fresh descriptor pool holding ``files`` (given imports first)."""
    pool = descriptor_pool.DescriptorPool()
    for f in files:
        pool.Add(f)
    return pool


class ScriptedServicer(ReflectionServicer):
    """A real reflection servicer that counts, can be slowed, gated, broken, or made to fail.

    - ``streams`` / ``symbol_questions`` / ``file_questions``: reflection calls / lookups seen;
    - ``delay``: seconds to sleep before each answer (released early by ``release``);
    - ``gate``: answers wait while it is clear (tests hold a refresh "in flight");
    - ``abort``: a status code every call fails with;
    - ``hide``: file names answered NOT_FOUND by file_by_filename;
    - ``rewrite``: applied to every file sent (to send broken descriptors).
    """

    def __init__(self, *args, delay: float = 0.0, hide: Iterable[str] = (),
                 rewrite: Callable[[bytes], bytes] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.hide = set(hide)
        self.rewrite = rewrite
        self.abort: grpc.StatusCode | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.release = threading.Event()
        self.streams = 0
        self.symbol_questions: collections.Counter[str] = collections.Counter()
        self.file_questions: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def ServerReflectionInfo(self, request_iterator: Iterator, context: grpc.ServicerContext):
        with self._lock:
            self.streams += 1
        if self.abort is not None:
            context.abort(self.abort, "scripted outage")
        yield from super().ServerReflectionInfo(request_iterator, context)

    def answer(self, request):
        if request.WhichOneof("message_request") == "file_containing_symbol":
            with self._lock:
                self.symbol_questions[request.file_containing_symbol] += 1
        if request.WhichOneof("message_request") == "file_by_filename":
            with self._lock:
                self.file_questions[request.file_by_filename] += 1
        self.gate.wait(timeout=30)
        if self.delay:
            self.release.wait(self.delay)
        if request.WhichOneof("message_request") == "file_by_filename" and request.file_by_filename in self.hide:
            return self.error(request, grpc.StatusCode.NOT_FOUND, "hidden by the test")
        return super().answer(request)

    def file_blobs(self, request, blobs):
        if self.rewrite is not None:
            blobs = [self.rewrite(b) for b in blobs]
        return super().file_blobs(request, blobs)


class ReflectionServer:
    """A running test server: ``.address``, ``.servicers`` (one per version), ``.serve_files()``,
    ``.stop()``."""

    def __init__(self, server: grpc.Server, port: int, servicers: list[ScriptedServicer]) -> None:
        self.server = server
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.servicers = servicers

    @property
    def servicer(self) -> ScriptedServicer:
        return self.servicers[0]

    @property
    def streams(self) -> int:
        return sum(s.streams for s in self.servicers)

    def serve_files(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        """From the next question on, answer from ``files`` instead (a service redeployed
        with other descriptors, e.g. another ``humans_who_can_rpc``)."""
        pool = pool_of(files)
        for s in self.servicers:
            s.pool = pool

    def stop(self) -> None:
        for s in self.servicers:
            s.release.set()
            s.gate.set()
        self.server.stop(grace=0).wait()


def start_reflection_server(files: Iterable[descriptor_pb2.FileDescriptorProto], services: Iterable[str],
                            versions: Iterable[str] = ("v1",), port: int = 0,
                            server_credentials: grpc.ServerCredentials | None = None,
                            **servicer_kwargs) -> ReflectionServer:
    """Serve reflection (our servicer) for ``services`` over ``files`` on 127.0.0.1
    (with TLS when ``server_credentials`` are given)."""
    pool = pool_of(files)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicers = []
    for version in versions:
        servicer = ScriptedServicer(services, version=version, pool=pool, **servicer_kwargs)
        add_servicer(server, servicer)
        servicers.append(servicer)
    if server_credentials is None:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        bound = server.add_secure_port(f"127.0.0.1:{port}", server_credentials)
    assert bound, f"could not listen on 127.0.0.1:{port}"
    server.start()
    return ReflectionServer(server, bound, servicers)


@contextlib.contextmanager
def reflection_server(files, services, **kwargs) -> Iterator[ReflectionServer]:
    """``start_reflection_server`` that always stops."""
    handle = start_reflection_server(files, services, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()
