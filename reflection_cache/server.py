"""Serve gRPC server reflection, v1 and/or v1alpha, from a descriptor pool.

grpcio-reflection ships only the v1alpha protocol; this module adds v1
(``grpc.reflection.v1.ServerReflection``) so a service can expose both:

    server = grpc.server(ThreadPoolExecutor())
    add_reflection(server, ["rpcauthz.demo.v1.Accounts"], versions=("v1", "v1alpha"))

The two protocol versions have identical messages, so one servicer class serves either,
parameterised by the version's generated modules. Works with the synchronous
``grpc.server`` (the handler is a plain generator).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

from reflection_cache.v1 import reflection_pb2 as v1_pb2
from reflection_cache.v1 import reflection_pb2_grpc as v1_pb2_grpc

#: Protocol version -> (messages module, stubs module).
VERSIONS: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1": (v1_pb2, v1_pb2_grpc),
    "v1alpha": (v1alpha_pb2, v1alpha_pb2_grpc),
}

#: The reflection service's own full name per version (add it to the list of services).
SERVICE_NAMES = {
    "v1": "grpc.reflection.v1.ServerReflection",
    "v1alpha": "grpc.reflection.v1alpha.ServerReflection",
}


class ReflectionServicer:
    """Answers reflection questions from ``pool`` for one protocol ``version``.

    ``service_names`` is what ``list_services`` reports. With ``include_dependencies``
    (the default, as grpcio-reflection does) a file answer carries the file and all its
    transitive imports; without it, only the file itself, so clients must ask for each
    import by name. Subclass and override :meth:`answer` to change single answers.
    """

    def __init__(self, service_names: Iterable[str], *, version: str = "v1",
                 pool: descriptor_pool.DescriptorPool | None = None,
                 include_dependencies: bool = True) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown reflection version {version!r}; expected one of {sorted(VERSIONS)}")
        self.version = version
        self.pb2 = VERSIONS[version][0]
        self.service_names = tuple(sorted(set(service_names)))
        self.pool = pool if pool is not None else descriptor_pool.Default()
        self.include_dependencies = include_dependencies

    # The gRPC method: one answer per question, in order.
    def ServerReflectionInfo(self, request_iterator: Iterator, context: grpc.ServicerContext) -> Iterator:
        for request in request_iterator:
            yield self.answer(request)

    def answer(self, request):
        """The ``ServerReflectionResponse`` for one ``ServerReflectionRequest``."""
        kind = request.WhichOneof("message_request")
        try:
            if kind == "file_by_filename":
                return self._files(request, self.pool.FindFileByName(request.file_by_filename))
            if kind == "file_containing_symbol":
                return self._files(request, self.pool.FindFileContainingSymbol(request.file_containing_symbol))
            if kind == "file_containing_extension":
                ask = request.file_containing_extension
                message = self.pool.FindMessageTypeByName(ask.containing_type)
                extension = self.pool.FindExtensionByNumber(message, ask.extension_number)
                # FieldDescriptor.file exists at run time; types-protobuf does not declare it.
                return self._files(request, extension.file)  # type: ignore[attr-defined]
            if kind == "all_extension_numbers_of_type":
                message = self.pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self.pool.FindAllExtensions(message))
                return self.pb2.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=self.pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers))
            if kind == "list_services":
                return self.pb2.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=self.pb2.ListServiceResponse(
                        service=[self.pb2.ServiceResponse(name=n) for n in self.service_names]))
        except KeyError:
            return self.error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return self.error(request, grpc.StatusCode.INVALID_ARGUMENT, "no question asked")

    def error(self, request, code: grpc.StatusCode, message: str):
        """An ``error_response`` answer carrying ``code``."""
        return self.pb2.ServerReflectionResponse(
            original_request=request,
            error_response=self.pb2.ErrorResponse(error_code=code.value[0], error_message=message))

    def _files(self, request, file: descriptor.FileDescriptor):
        files = [file]
        if self.include_dependencies:
            seen = {file.name}
            for f in files:  # grows while iterating: breadth-first over imports
                for dep in f.dependencies:
                    if dep.name not in seen:
                        seen.add(dep.name)
                        files.append(dep)
        blobs = []
        for f in files:
            proto = descriptor_pb2.FileDescriptorProto()
            f.CopyToProto(proto)
            blobs.append(proto.SerializeToString())
        return self.file_blobs(request, blobs)

    def file_blobs(self, request, blobs: list[bytes]):
        """A ``file_descriptor_response`` answer carrying these serialized files as-is."""
        return self.pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=self.pb2.FileDescriptorResponse(file_descriptor_proto=blobs))


def add_servicer(server: grpc.Server, servicer: ReflectionServicer) -> None:
    """Register ``servicer`` on ``server`` under its protocol version's service name."""
    VERSIONS[servicer.version][1].add_ServerReflectionServicer_to_server(servicer, server)


def add_reflection(server: grpc.Server, service_names: Iterable[str],
                   versions: Iterable[str] = ("v1", "v1alpha"), *,
                   pool: descriptor_pool.DescriptorPool | None = None,
                   include_dependencies: bool = True) -> list[ReflectionServicer]:
    """Serve reflection for ``service_names`` on ``server`` in each of ``versions``.

    The reflection services themselves are added to what ``list_services`` reports.
    """
    versions = tuple(versions)
    names = [*service_names, *(SERVICE_NAMES[v] for v in versions if v in SERVICE_NAMES)]
    servicers = []
    for version in versions:
        servicer = ReflectionServicer(names, version=version, pool=pool,
                                      include_dependencies=include_dependencies)
        add_servicer(server, servicer)
        servicers.append(servicer)
    return servicers
