"""A byte-exact stream forwarder between TCP, unix and vsock sockets.

One :class:`Forwarder` listens on one address and, for every accepted connection, opens one
connection to the target and copies bytes both ways:

* half-close: EOF from one side is passed on as a write-EOF (``shutdown(SHUT_WR)``) to the other,
  whose direction keeps flowing until it ends too;
* backpressure: when one side's write buffer passes ``buffer_size`` bytes, reading from the other
  side pauses until it drains, so memory per connection is bounded;
* limits: at most ``max_connections`` at once; extras wait up to ``queue_timeout`` seconds for a
  slot (0 = refuse at once) and are closed if none frees up;
* timeouts: ``connect_timeout`` for reaching the target, ``idle_timeout`` with no bytes either way;
* shutdown: stop accepting, let in-flight connections finish for up to ``shutdown_grace`` seconds,
  then close them.

On the parent instance it runs Envoy (TCP) -> vsock; inside the enclave vsock -> the broker, and
the broker's egress -> vsock -> parent -> Envoy.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass

from .addresses import Address, TcpAddress, UnixAddress, VsockAddress, vsock_socket

log = logging.getLogger("enclave_bridge.forward")


@dataclass(frozen=True)
class ForwarderConfig:
    """How one forwarder behaves. Defaults suit the broker path (few, long-lived TLS connections)."""

    listen: Address
    target: Address
    max_connections: int = 256
    queue_timeout: float = 0.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = 300.0
    shutdown_grace: float = 10.0
    buffer_size: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.queue_timeout < 0 or self.connect_timeout <= 0 or self.shutdown_grace < 0:
            raise ValueError("timeouts must be positive (queue_timeout and shutdown_grace may be 0)")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive, or None for no idle limit")
        if not 1024 <= self.buffer_size <= 16 * 1024 * 1024:
            raise ValueError("buffer_size must be between 1 KiB and 16 MiB")


@dataclass
class ForwarderStats:
    accepted: int = 0
    refused: int = 0
    connect_failures: int = 0
    idle_closed: int = 0
    active: int = 0
    completed: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0


class _Side(asyncio.Protocol):
    """One socket of a forwarded pair. Bytes it receives are written to its peer's transport.

    Backpressure is the transports' own flow control: when this side's write buffer passes the
    high-water mark, asyncio calls :meth:`pause_writing` and we stop reading from the peer.
    """

    def __init__(self, link: _Link, counter: str) -> None:
        self.link = link
        self.counter = counter  # the stats field for bytes this side receives
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.got_eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.link.buffer_size)
        if self is self.link.client:
            self.link.on_client_made()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        self.link.last_activity = time.monotonic()
        stats = self.link.stats
        setattr(stats, self.counter, getattr(stats, self.counter) + len(data))
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer.transport.can_write_eof():
                peer.transport.write_eof()  # pass the half-close on; the other direction keeps flowing
        self.link.check_finished()
        return True  # keep our own sending half open

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.side_lost(self, exc)


class _Link:
    """A client connection and its target connection, and how the pair ends."""

    def __init__(self, forwarder: Forwarder, on_client_made) -> None:
        self.on_client_made = on_client_made
        self.buffer_size = forwarder.config.buffer_size
        self.stats = forwarder.stats
        self.client = _Side(self, "bytes_to_target")
        self.target = _Side(self, "bytes_to_client")
        self.client.peer, self.target.peer = self.target, self.client
        self.last_activity = time.monotonic()
        self.finished = asyncio.get_running_loop().create_future()

    def check_finished(self) -> None:
        """Both directions ended cleanly: close both (buffered bytes are flushed first)."""
        if self.client.got_eof and self.target.got_eof:
            for side in (self.client, self.target):
                if side.transport is not None:
                    side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        other = self.target if side is self.client else self.client
        if exc is not None or not (side.got_eof and other.got_eof):
            if exc is not None:
                log.debug("%s side of %s ended with %r", "client" if side is self.client else "target",
                          _peer(self.client.transport), exc)
            if other.transport is not None and not other.lost:
                other.transport.abort()  # one side is gone: reset the other rather than leave it half-dead
        if self.client.lost and (self.target.lost or self.target.transport is None):
            if not self.finished.done():
                self.finished.set_result(None)

    def abort(self) -> None:
        for side in (self.client, self.target):
            if side.transport is not None and not side.lost:
                side.transport.abort()


class Forwarder:
    """Listens on ``config.listen`` and forwards every connection to ``config.target``."""

    def __init__(self, config: ForwarderConfig) -> None:
        self.config = config
        self.stats = ForwarderStats()
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(config.max_connections)
        self._waiting = 0
        self._tasks: set[asyncio.Task] = set()
        self._links: set[_Link] = set()
        self._closing = False
        self._closed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        if isinstance(listen, TcpAddress):
            self._server = await loop.create_server(self._new_client, listen.host, listen.port, reuse_address=True)
        elif isinstance(listen, UnixAddress):
            _remove_stale_unix_socket(listen.path)
            self._server = await loop.create_unix_server(self._new_client, listen.path)
        else:
            self._server = await loop.create_server(self._new_client, sock=vsock_socket(listen, "listen"))
        log.info("forwarding %s -> %s", self.bound_address, self.config.target)

    @property
    def bound_address(self) -> Address:
        """The listening address, with the real port when the configured TCP port was 0."""
        listen = self.config.listen
        if isinstance(listen, TcpAddress) and self._server is not None:
            return TcpAddress(listen.host, self._server.sockets[0].getsockname()[1])
        return listen

    async def serve_until_closed(self) -> None:
        await self._closed.wait()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting; give in-flight connections ``grace`` seconds, then cut them."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
            if isinstance(self.config.listen, UnixAddress):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.listen.path)
        pending = set(self._tasks)
        if pending:
            log.info("shutting down: %d connection(s) in flight, grace %.1fs", len(pending), grace)
            _, still_running = await asyncio.wait(pending, timeout=grace)
            for link in list(self._links):
                link.abort()
            if still_running:
                _, still_running = await asyncio.wait(still_running, timeout=5)
            for task in still_running:
                task.cancel()
        self._closed.set()
        log.info("stopped: %s", self.stats)

    @property
    def closing(self) -> bool:
        """True once :meth:`shutdown` has begun."""
        return self._closing

    def abort_all(self) -> None:
        """Reset every forwarded connection now (shutdown without waiting for the grace)."""
        for link in list(self._links):
            link.abort()

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # -- one connection ---------------------------------------------------------------------

    def _new_client(self) -> _Side:
        link: _Link = _Link(self, on_client_made=lambda: self._client_made(link))
        return link.client

    def _client_made(self, link: _Link) -> None:
        assert link.client.transport is not None
        link.client.transport.pause_reading()  # nothing is read until the target is connected
        task = asyncio.get_running_loop().create_task(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: _Link) -> None:
        client = link.client.transport
        assert client is not None
        got_slot = not self._closing and await self._take_slot()
        if not got_slot or self._closing:
            if got_slot:
                self._slots.release()
            self.stats.refused += 1
            reason = "shutting down" if self._closing else f"{self.config.max_connections} connections already open"
            log.warning("refused a connection from %s: %s", _peer(client), reason)
            client.abort()
            return
        self._links.add(link)
        self.stats.accepted += 1
        self.stats.active += 1
        watchdog: asyncio.Task | None = None
        try:
            if link.client.lost:
                return
            try:
                await asyncio.wait_for(connect_protocol(self.config.target, lambda: link.target),
                                       self.config.connect_timeout)
            except (TimeoutError, OSError) as e:
                self.stats.connect_failures += 1
                log.warning("cannot reach %s for %s: %s", self.config.target, _peer(client), e or "timed out")
                link.abort()
                return
            if link.client.lost:  # the client went away while we connected
                link.abort()
            else:
                client.resume_reading()
            if self.config.idle_timeout is not None:
                watchdog = asyncio.create_task(self._idle_watchdog(link))
            await link.finished
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._links.discard(link)
            self._slots.release()
            self.stats.active -= 1
            self.stats.completed += 1

    async def _take_slot(self) -> bool:
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        if self.config.queue_timeout <= 0 or self._waiting >= self.config.max_connections:
            return False
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.queue_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _idle_watchdog(self, link: _Link) -> None:
        timeout = self.config.idle_timeout
        assert timeout is not None
        while True:
            remaining = link.last_activity + timeout - time.monotonic()
            if remaining <= 0:
                self.stats.idle_closed += 1
                log.info("closing %s: idle for %.0fs", _peer(link.client.transport), timeout)
                link.abort()
                return
            await asyncio.sleep(remaining)


async def connect_protocol(address: Address, factory) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Connect ``factory()``'s protocol to ``address`` (tcp, unix or vsock)."""
    loop = asyncio.get_running_loop()
    if isinstance(address, TcpAddress):
        return await loop.create_connection(factory, address.host, address.port)
    if isinstance(address, UnixAddress):
        return await loop.create_unix_connection(factory, address.path)
    assert isinstance(address, VsockAddress)
    sock = vsock_socket(address, "connect")
    try:
        await loop.sock_connect(sock, (address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return await loop.create_connection(factory, sock=sock)


async def open_stream(address: Address, limit: int = 64 * 1024) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``address`` (tcp, unix or vsock) and return asyncio streams."""
    if isinstance(address, TcpAddress):
        return await asyncio.open_connection(address.host, address.port, limit=limit)
    if isinstance(address, UnixAddress):
        return await asyncio.open_unix_connection(address.path, limit=limit)
    assert isinstance(address, VsockAddress)
    sock = vsock_socket(address, "connect")
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=limit)


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a previous run; refuse to delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another process is already listening there")


def _peer(transport: asyncio.BaseTransport | asyncio.StreamWriter | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer) if peer else "a unix peer"


async def run(config: ForwarderConfig, *, ready=None) -> ForwarderStats:
    """Run one forwarder until SIGTERM or SIGINT, then shut down gracefully; a second signal cuts
    in-flight connections at once. ``ready(forwarder)`` is called once it listens."""
    forwarder = Forwarder(config)
    await forwarder.start()
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future] = []

    def on_signal() -> None:
        if forwarder.closing:
            log.warning("second signal: closing %d connection(s) now", len(forwarder._links))
            forwarder.abort_all()
        else:
            pending.append(asyncio.ensure_future(forwarder.shutdown()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    if ready is not None:
        ready(forwarder)
    await forwarder.serve_until_closed()
    return forwarder.stats
