"""Ask a service, through gRPC server reflection, which ``humans_who_can_rpc`` options it declares.

One fetch, for one service at one endpoint, within one deadline:

1. ``file_containing_symbol(service)`` over ``grpc.reflection.v1`` (falling back to
   ``grpc.reflection.v1alpha`` when the endpoint answers UNIMPLEMENTED; which one works is
   remembered per endpoint);
2. ``file_by_filename`` for every import not yet received (bounded in count and depth).
   Each question is one short call on the reflection method; all share one deadline and the
   endpoint's channel;
3. the files go into a private descriptor pool, the service is looked up there, and each
   method's option and the service's default are read by the extension's full name
   (``rpcauthz.v1.humans_who_can_rpc`` / ``rpcauthz.v1.default_humans_who_can_rpc``) as
   declared in the returned files. A service that vendors its own copy of options.proto (same
   full names, any file path) works; a service whose files do not declare the extension has no
   options, so every method falls to the configured default.

   A refresh whose files are byte for byte those of the service's previous answer (a digest of
   each file's bytes as received) returns that answer's ``ServiceModes`` without building a
   pool again: the same bytes declare the same modes. The pool is ~a quarter of a fetch's CPU, and
   each pool is cyclic garbage only the collector frees (~1.5 ms each at 2,500 services), so a
   cache refreshing thousands of unchanged services every ``ttl`` no longer builds one each.

Errors (all :class:`~reflection_cache.types.ReflectionError`, each naming service and endpoint):
:class:`UnknownService`, :class:`ReflectionUnavailable`, :class:`MalformedDescriptors`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pathlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TypeVar

import cachetools
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from policy import Mode
from reflection_cache.types import MalformedDescriptors, ReflectionUnavailable, ServiceModes, UnknownService
from reflection_cache.v1 import reflection_pb2 as v1_pb2

log = logging.getLogger(__name__)
_T = TypeVar("_T")

METHOD_OPTION = "rpcauthz.v1.humans_who_can_rpc"
SERVICE_OPTION = "rpcauthz.v1.default_humans_who_can_rpc"
_OPTION_TARGETS = {METHOD_OPTION: "google.protobuf.MethodOptions",
                   SERVICE_OPTION: "google.protobuf.ServiceOptions"}

#: Protocol versions, in the order they are tried.
PROTOCOLS = {"v1": v1_pb2, "v1alpha": v1alpha_pb2}

DEFAULT_DEADLINE = 0.5
DEFAULT_MAX_FILES = 64
DEFAULT_MAX_DEPTH = 16
#: At most this many channels open at once (least recently used are closed past it): sized
#: for 10,000 services with one endpoint each all fetched within one idle timeout.
DEFAULT_MAX_CHANNELS = 12_288
#: A channel not used for this many seconds is closed. Each open channel (with its
#: connection) costs ~43 KB of RSS, and a service is fetched once per cache ``ttl`` (60 s), so
#: holding a channel per endpoint between fetches would cost ~430 MB at 10,000 endpoints to
#: save ~1-2 ms of CPU per fetch (a re-dial). A fetch holds its channel for all its questions;
#: fetches close together (services behind one endpoint, a cold start) share it. See
#: docs/reflection.md.
DEFAULT_IDLE_TIMEOUT = 0.5
#: Services whose last answer's digest and modes are kept to skip re-reading unchanged files
#: (least recently fetched dropped past it): ~150 bytes each beside the modes the cache holds.
DEFAULT_MAX_REMEMBERED = 12_288
#: Channel options: reflection answers can be large (a file and all its imports), and a
#: reflection server that comes back after an outage should be dialled again soon.
DEFAULT_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # Own subchannels, so a channel dialled afresh does not inherit a shared one's backoff.
    ("grpc.use_local_subchannel_pool", 1),
)


def tls_credentials(ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for reflection channels: trust ``ca_file`` (PEM; the system roots when
    None) and, for mutual TLS, present ``cert_file``/``key_file`` (PEM, both or neither).
    Files that cannot be read are refused by name (``ValueError``)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("reflection TLS: cert_file and key_file go together (mutual TLS)")

    def read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return pathlib.Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"reflection TLS: cannot read {what} {path}: {e.strerror}") from None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file, "ca_file"),
                                        private_key=read(key_file, "key_file"),
                                        certificate_chain=read(cert_file, "cert_file"))


class ChannelPool:
    """``grpc.aio`` channels, one per endpoint, at most ``max_channels`` (LRU), each closed
    once it has been idle for ``idle_timeout`` seconds (None: kept until pushed out).

    Plaintext unless ``credentials`` (see :func:`tls_credentials`) are given, in which case
    every endpoint is dialled with TLS. A channel pushed out of the pool or idle too long is
    closed in the background; a channel held by a call in progress (:meth:`lease`) is not
    closed for idleness. Create and use the pool inside one event loop.
    """

    def __init__(self, max_channels: int = DEFAULT_MAX_CHANNELS,
                 options: Iterable[tuple[str, object]] = DEFAULT_CHANNEL_OPTIONS,
                 credentials: grpc.ChannelCredentials | None = None,
                 extra_options: Iterable[tuple[str, object]] = (),
                 per_endpoint: Mapping[str, tuple[grpc.ChannelCredentials | None,
                                                  Iterable[tuple[str, object]]]] | None = None,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``credentials`` and ``extra_options`` (e.g. a TLS server name override) apply to
        every endpoint except those in ``per_endpoint`` (``host:port`` -> (credentials or
        None for plaintext, extra options))."""
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive seconds or None, not {idle_timeout!r}")
        self.max_channels = max_channels
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._options = list(options)
        self._credentials = credentials
        self._extra = list(extra_options)
        self._per_endpoint = {k: (c, list(o)) for k, (c, o) in (per_endpoint or {}).items()}
        self._closing: set[asyncio.Task] = set()
        #: endpoint -> channel, least recently used first.
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._last_used: dict[str, float] = {}
        self._busy: dict[str, int] = {}  # endpoint -> calls in progress (leases)
        self._sweep: asyncio.TimerHandle | None = None

    def get(self, endpoint: str) -> grpc.aio.Channel:
        """The channel to ``endpoint`` (``host:port``), created on first use."""
        channel = self._channels.pop(endpoint, None)
        if channel is None:
            while len(self._channels) >= self.max_channels:
                self.discard(next(iter(self._channels)))
            credentials, extra = self._per_endpoint.get(endpoint, (self._credentials, self._extra))
            options = self._options + extra
            if credentials is None:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        self._channels[endpoint] = channel  # now the most recently used
        self._last_used[endpoint] = self._clock()
        self._schedule_sweep()
        return channel

    @contextlib.contextmanager
    def lease(self, endpoint: str) -> Iterator[grpc.aio.Channel]:
        """The channel to ``endpoint`` for one call: not closed for idleness until the call
        is over (and then idle from that moment)."""
        channel = self.get(endpoint)
        self._busy[endpoint] = self._busy.get(endpoint, 0) + 1
        try:
            yield channel
        finally:
            left = self._busy[endpoint] - 1
            if left:
                self._busy[endpoint] = left
            else:
                del self._busy[endpoint]
            if endpoint in self._last_used:
                self._last_used[endpoint] = self._clock()

    def discard(self, endpoint: str) -> None:
        """Close and forget the channel to ``endpoint`` (the next ``get`` dials afresh)."""
        channel = self._channels.pop(endpoint, None)
        self._last_used.pop(endpoint, None)
        if channel is not None:
            self._close_later(channel)

    def close_idle(self) -> int:
        """Close every channel idle for ``idle_timeout`` or longer; how many were closed.
        (Runs by itself every half ``idle_timeout`` while channels are open.)"""
        if self.idle_timeout is None:
            return 0
        cutoff = self._clock() - self.idle_timeout
        idle = [e for e, used in self._last_used.items() if used <= cutoff and e not in self._busy]
        for endpoint in idle:
            self.discard(endpoint)
        return len(idle)

    def _schedule_sweep(self) -> None:
        if self.idle_timeout is None or self._sweep is not None:
            return
        self._sweep = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self.close_idle()
        if self._channels:
            self._schedule_sweep()

    def __len__(self) -> int:
        return len(self._channels)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        channels = list(self._channels.values())
        self._channels.clear()
        self._last_used.clear()
        await asyncio.gather(*(c.close(grace=None) for c in channels), *self._closing,
                             return_exceptions=True)


class _Unimplemented(Exception):
    """The endpoint does not serve this reflection protocol version."""


class ReflectionClient:
    """Fetches the options of services through reflection (see the module docstring).

    ``deadline`` bounds one whole fetch (all questions, both protocol versions), in seconds.
    ``max_files`` and ``max_depth`` bound how many files and how deep an import chain are
    followed before the answer is refused as malformed.
    """

    def __init__(self, *, deadline: float = DEFAULT_DEADLINE, max_files: int = DEFAULT_MAX_FILES,
                 max_depth: int = DEFAULT_MAX_DEPTH, channels: ChannelPool | None = None) -> None:
        if deadline <= 0:
            raise ValueError("deadline must be positive")
        self.deadline = deadline
        self.max_files = max_files
        self.max_depth = max_depth
        self.channels = channels if channels is not None else ChannelPool()
        #: endpoint -> protocol version that answered last time.
        self.protocol_of: cachetools.LRUCache = cachetools.LRUCache(maxsize=DEFAULT_MAX_CHANNELS)
        #: service -> (digest of its files, the modes read from them) of its last answer.
        self._last: cachetools.LRUCache[str, tuple[bytes, ServiceModes]] = cachetools.LRUCache(
            maxsize=DEFAULT_MAX_REMEMBERED)
        #: Fetches answered with the same files as the service's previous answer (no pool built).
        self.unchanged = 0

    async def close(self) -> None:
        await self.channels.close()

    async def fetch(self, service: str, endpoint: str, *, deadline: float | None = None) -> ServiceModes:
        """The options ``service`` declares, asked of the reflection service at ``endpoint``."""
        where = f"service {service} at reflection endpoint {endpoint}"
        files, digest = await self._fetch_files(service, endpoint, deadline)
        last = self._last.get(service)
        if last is not None and last[0] == digest:
            self.unchanged += 1
            return last[1]
        modes = read_modes(service, files, where)
        self._last[service] = (digest, modes)
        return modes

    async def fetch_files(self, service: str, endpoint: str, *, deadline: float | None = None
                          ) -> dict[str, descriptor_pb2.FileDescriptorProto]:
        """The files declaring ``service`` and their imports, as reflection returned them
        (``build_pool`` turns them into a descriptor pool, e.g. to read a method's input type)."""
        return (await self._fetch_files(service, endpoint, deadline))[0]

    async def list_services(self, endpoint: str, *, deadline: float | None = None) -> list[str]:
        """The names of the services the reflection service at ``endpoint`` lists (its
        ``list_services`` answer, in its order), through whichever reflection version it
        serves. Raises ``ReflectionUnavailable`` (unreachable, an error answer, past the
        deadline) or ``MalformedDescriptors`` (an answer of another kind)."""
        where = f"reflection endpoint {endpoint}"

        async def ask(protocol: str, end: float) -> list[str]:
            answer = await self._ask(protocol, endpoint, end, where, list_services="")
            if not isinstance(answer, list):
                raise ReflectionUnavailable(f"{where}: reflection answered error {answer.error_code} "
                                            f"to list_services: {answer.error_message}")
            return answer
        return await self._by_protocol(endpoint, deadline, where, ask)

    async def _fetch_files(self, service: str, endpoint: str, deadline: float | None
                           ) -> tuple[dict[str, descriptor_pb2.FileDescriptorProto], bytes]:
        """``fetch_files``' files and a digest of their bytes as received (``_files``)."""
        where = f"service {service} at reflection endpoint {endpoint}"
        return await self._by_protocol(endpoint, deadline, where,
                                       lambda protocol, end: self._files(protocol, service, endpoint, end, where))

    async def _by_protocol(self, endpoint: str, deadline: float | None, where: str,
                           ask: Callable[[str, float], Awaitable[_T]]) -> _T:
        """``ask(protocol, end)`` with the reflection version ``endpoint`` answered last time
        first, then the other, within ``deadline`` (default: the client's) in all, on one
        leased channel (not closed for idleness between the questions)."""
        budget = self.deadline if deadline is None else deadline
        known = self.protocol_of.get(endpoint)
        order = [known] + [p for p in PROTOCOLS if p != known] if known else list(PROTOCOLS)
        try:
            with self.channels.lease(endpoint):
                async with asyncio.timeout(budget):
                    end = asyncio.get_running_loop().time() + budget
                    for protocol in order:
                        try:
                            answer = await ask(protocol, end)
                        except _Unimplemented:
                            continue
                        self.protocol_of[endpoint] = protocol
                        return answer
        except TimeoutError:
            raise ReflectionUnavailable(f"{where}: no answer within the {budget:g}s deadline") from None
        self.protocol_of.pop(endpoint, None)
        raise ReflectionUnavailable(
            f"{where}: the endpoint serves neither grpc.reflection.v1 nor v1alpha (UNIMPLEMENTED)")

    async def _ask(self, protocol: str, endpoint: str, end: float, where: str, **question):
        """One question, one answer: the files (list of bytes) or the ErrorResponse.

        Each question is its own call carrying exactly one request (a unary-request call on
        the streaming method: the same bytes on the wire). Writing into an open bidi stream
        races a server's immediate UNIMPLEMENTED, which grpc.aio then reports as INTERNAL;
        sending request and half-close together does not.
        """
        pb2 = PROTOCOLS[protocol]
        with self.channels.lease(endpoint) as channel:
            return await self._ask_on(channel, pb2, protocol, endpoint, end, where, question)

    async def _ask_on(self, channel: grpc.aio.Channel, pb2, protocol: str, endpoint: str,
                      end: float, where: str, question: dict):
        method = channel.unary_stream(
            f"/grpc.reflection.{protocol}.ServerReflection/ServerReflectionInfo",
            request_serializer=pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=pb2.ServerReflectionResponse.FromString)
        timeout = max(end - asyncio.get_running_loop().time(), 0.001)
        call = method(pb2.ServerReflectionRequest(**question), timeout=timeout)
        try:
            answers = [a async for a in call]
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise _Unimplemented() from None
            if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ReflectionUnavailable(f"{where}: deadline exceeded ({protocol})") from None
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                # Dial afresh next time rather than wait out the channel's reconnect backoff.
                self.channels.discard(endpoint)
            raise ReflectionUnavailable(
                f"{where}: reflection failed with {e.code().name}: {e.details()} ({protocol})") from None
        finally:
            call.cancel()
        if len(answers) != 1:
            raise MalformedDescriptors(f"{where}: one question got {len(answers)} answers ({protocol})")
        answer = answers[0]
        kind = answer.WhichOneof("message_response")
        if kind == "error_response":
            return answer.error_response
        if "list_services" in question:
            if kind != "list_services_response":
                raise MalformedDescriptors(f"{where}: asked for its services, got {kind or 'an empty answer'}")
            return [s.name for s in answer.list_services_response.service]
        if kind != "file_descriptor_response":
            raise MalformedDescriptors(f"{where}: asked for files, got {kind or 'an empty answer'}")
        return list(answer.file_descriptor_response.file_descriptor_proto)

    async def _files(self, protocol: str, service: str, endpoint: str, end: float,
                     where: str) -> tuple[dict[str, descriptor_pb2.FileDescriptorProto], bytes]:
        """The files (by name) and a digest of them: each file's name and the sha256 of its
        bytes as received, in name order (so the order of the answers does not matter)."""
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        sums: dict[str, bytes] = {}
        depth: dict[str, int] = {}

        def take(blobs: list[bytes], level: int) -> list[str]:
            names = []
            for blob in blobs:
                try:
                    fdp = descriptor_pb2.FileDescriptorProto.FromString(blob)
                except message.DecodeError as e:
                    raise MalformedDescriptors(f"{where}: a file descriptor does not parse: {e}") from None
                if not fdp.name:
                    raise MalformedDescriptors(f"{where}: a file descriptor has no file name")
                if fdp.name not in files:
                    files[fdp.name] = fdp
                    sums[fdp.name] = hashlib.sha256(blob).digest()
                    depth[fdp.name] = level
                    names.append(fdp.name)
            if len(files) > self.max_files:
                raise MalformedDescriptors(f"{where}: more than {self.max_files} files in the import graph")
            return names

        first = await self._ask(protocol, endpoint, end, where, file_containing_symbol=service)
        if not isinstance(first, list):
            if first.error_code == grpc.StatusCode.NOT_FOUND.value[0]:
                raise UnknownService(f"{where}: reflection does not know {service} (NOT_FOUND)")
            raise ReflectionUnavailable(
                f"{where}: reflection answered error {first.error_code}: {first.error_message}")
        if not take(first, 0):
            raise MalformedDescriptors(f"{where}: reflection answered with no files")

        # Breadth-first over imports the server did not send along.
        pending = deque(files)
        while pending:
            name = pending.popleft()
            for dep in files[name].dependency:
                if dep in files:
                    continue
                level = depth[name] + 1
                if level > self.max_depth:
                    raise MalformedDescriptors(
                        f"{where}: import chain deeper than {self.max_depth} files at {dep}")
                answer = await self._ask(protocol, endpoint, end, where, file_by_filename=dep)
                if not isinstance(answer, list):
                    if answer.error_code != grpc.StatusCode.NOT_FOUND.value[0]:
                        raise ReflectionUnavailable(
                            f"{where}: reflection answered error {answer.error_code} for {dep}: "
                            f"{answer.error_message}")
                    answer = _well_known(dep)
                    if answer is None:
                        raise MalformedDescriptors(
                            f"{where}: {name} imports {dep}, which reflection does not have")
                pending.extend(take(answer, level))
                if dep not in files:
                    raise MalformedDescriptors(f"{where}: asked for {dep}, got other files")
        digest = hashlib.sha256()
        for name in sorted(sums):
            digest.update(name.encode("utf-8", "surrogatepass") + b"\0" + sums[name])
        return files, digest.digest()


def _well_known(name: str) -> list[bytes] | None:
    """Our own copy of a google/protobuf/*.proto file, for servers that do not serve them."""
    if not name.startswith("google/protobuf/"):
        return None
    try:
        file = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    fdp = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(fdp)
    return [fdp.SerializeToString()]


def build_pool(files: dict[str, descriptor_pb2.FileDescriptorProto], where: str) -> descriptor_pool.DescriptorPool:
    """A private pool holding ``files``, added imports first; refuses gaps, cycles, conflicts."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    visiting: set[str] = set()

    def add(name: str, importer: str | None) -> None:
        if name in added:
            return
        if name in visiting:
            raise MalformedDescriptors(f"{where}: import cycle through {name}")
        if name not in files:
            raise MalformedDescriptors(f"{where}: {importer} imports {name}, which reflection did not return")
        visiting.add(name)
        for dep in files[name].dependency:
            add(dep, name)
        visiting.discard(name)
        try:
            pool.Add(files[name])
        except Exception as e:  # upb raises TypeError/ValueError; pure python others
            raise MalformedDescriptors(f"{where}: {name} does not link: {e}") from None
        added.add(name)

    for name in files:
        add(name, None)
    return pool


def _option_reader(pool: descriptor_pool.DescriptorPool, full_name: str, where: str):
    """(extension, options message class) for ``full_name``, or None when no file declares it."""
    try:
        extension = pool.FindExtensionByName(full_name)
    except KeyError:
        return None
    target = _OPTION_TARGETS[full_name]
    extended = extension.containing_type.full_name if extension.containing_type is not None else "nothing"
    if extended != target or extension.type not in (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_INT32):
        raise MalformedDescriptors(
            f"{where}: {full_name} is declared on {extended} with field "
            f"type {extension.type}; expected an enum extension of {target}")
    return extension, message_factory.GetMessageClass(pool.FindMessageTypeByName(target))


def _read(reader, options: message.Message) -> Mode | None:
    """The option's value in ``options`` (parsed afresh against the private pool), or None."""
    if reader is None:
        return None
    extension, options_class = reader
    parsed = options_class.FromString(options.SerializeToString())
    if not parsed.HasExtension(extension):
        return None
    value = int(parsed.Extensions[extension])
    try:
        return Mode(value)
    except ValueError:
        # A number from a newer options.proto than ours: never let it widen access.
        log.warning("unknown humans_who_can_rpc value %d; treating it as BREAK_GLASS_ONLY", value)
        return Mode.BREAK_GLASS_ONLY


def read_modes(service: str, files: dict[str, descriptor_pb2.FileDescriptorProto],
               where: str = "") -> ServiceModes:
    """The ``ServiceModes`` of ``service`` as declared in ``files`` (reflection's answer)."""
    where = where or f"service {service}"
    pool = build_pool(files, where)
    try:
        svc = pool.FindServiceByName(service)
    except KeyError:
        raise UnknownService(f"{where}: {service} is not a service in the files reflection returned") from None
    method_reader = _option_reader(pool, METHOD_OPTION, where)
    service_reader = _option_reader(pool, SERVICE_OPTION, where)
    return ServiceModes(
        service=service,
        # Read-only: one cached ServiceModes is shared by every request.
        methods=MappingProxyType({m.name: _read(method_reader, m.GetOptions()) for m in svc.methods}),
        service_default=_read(service_reader, svc.GetOptions()),
    )
