"""A byte-exact stream forwarder between TCP, unix and vsock sockets.

One :class:`Forwarder` listens on one address and, for every accepted connection, opens one
connection to the target and copies bytes both ways:

* half-close: EOF from one side is passed on as a write-EOF (``shutdown(SHUT_WR)``) to the other,
  whose direction keeps flowing until it ends too;
* backpressure: each direction reads at most ``buffer_size`` bytes and waits for the write to
  drain before reading again, so memory per connection is bounded;
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
from dataclasses import dataclass, field

from .addresses import Address, TcpAddress, UnixAddress, VsockAddress, parse_address, vsock_socket

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

    @classmethod
    def from_urls(cls, listen: str, to: str, **options) -> "ForwarderConfig":
        return cls(listen=parse_address(listen, "listen"), target=parse_address(to, "connect"), **options)


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


@dataclass(eq=False)
class _Connection:
    client_writer: asyncio.StreamWriter
    target_writer: asyncio.StreamWriter | None = None
    last_activity: float = field(default_factory=time.monotonic)

    def abort(self) -> None:
        for writer in (self.client_writer, self.target_writer):
            if writer is not None:
                writer.transport.abort()


class Forwarder:
    """Listens on ``config.listen`` and forwards every connection to ``config.target``."""

    def __init__(self, config: ForwarderConfig) -> None:
        self.config = config
        self.stats = ForwarderStats()
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(config.max_connections)
        self._waiting = 0
        self._tasks: set[asyncio.Task] = set()
        self._connections: set[_Connection] = set()
        self._closing = False
        self._closed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address cannot be bound."""
        listen, limit = self.config.listen, self.config.buffer_size
        if isinstance(listen, TcpAddress):
            self._server = await asyncio.start_server(self._accept, listen.host, listen.port, limit=limit,
                                                      reuse_address=True)
        elif isinstance(listen, UnixAddress):
            _remove_stale_unix_socket(listen.path)
            self._server = await asyncio.start_unix_server(self._accept, listen.path, limit=limit)
        else:
            self._server = await asyncio.start_server(self._accept, sock=vsock_socket(listen, "listen"),
                                                      limit=limit)
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
            for conn in list(self._connections):
                conn.abort()
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=5)
        self._closed.set()
        log.info("stopped: %s", self.stats)

    async def __aenter__(self) -> "Forwarder":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # -- one connection ---------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._closing or not await self._take_slot():
                self.stats.refused += 1
                log.warning("refused a connection from %s: %d connections already open",
                            _peer(client_writer), self.config.max_connections)
                client_writer.transport.abort()
                return
            try:
                await self._forward(client_reader, client_writer)
            finally:
                self._slots.release()
        finally:
            self._tasks.discard(task)

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
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        conn = _Connection(client_writer)
        self._connections.add(conn)
        watchdog: asyncio.Task | None = None
        try:
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    open_stream(self.config.target, self.config.buffer_size), self.config.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                self.stats.connect_failures += 1
                log.warning("cannot reach %s for %s: %s", self.config.target, _peer(client_writer),
                            e or "timed out")
                client_writer.transport.abort()
                return
            conn.target_writer = target_writer
            for writer in (client_writer, target_writer):
                writer.transport.set_write_buffer_limits(high=self.config.buffer_size)
            if self.config.idle_timeout is not None:
                watchdog = asyncio.create_task(self._idle_watchdog(conn))
            pipes = {
                asyncio.create_task(self._pipe(client_reader, target_writer, conn, "bytes_to_target")),
                asyncio.create_task(self._pipe(target_reader, client_writer, conn, "bytes_to_client")),
            }
            try:
                done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
                failed = any(not t.cancelled() and t.exception() is not None for t in done)
                if failed:
                    conn.abort()  # one side failed: reset both rather than leave a half-dead pair
                    await asyncio.wait(pipes)
            finally:
                for task in pipes:
                    if task.done() and not task.cancelled():
                        task.exception()  # retrieved: a reset peer is logged below, not as a stray task error
                    else:
                        task.cancel()
            if not failed:
                for writer in (client_writer, target_writer):
                    writer.close()
                for writer in (client_writer, target_writer):
                    with contextlib.suppress(OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(writer.wait_closed(), 5)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._connections.discard(conn)
            self.stats.active -= 1
            self.stats.completed += 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection,
                    counter: str) -> None:
        size = self.config.buffer_size
        while True:
            data = await reader.read(size)
            if not data:
                break
            conn.last_activity = time.monotonic()
            writer.write(data)
            setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
            await writer.drain()
            conn.last_activity = time.monotonic()
        if writer.can_write_eof() and not writer.transport.is_closing():
            writer.write_eof()

    async def _idle_watchdog(self, conn: _Connection) -> None:
        timeout = self.config.idle_timeout
        assert timeout is not None
        while True:
            remaining = conn.last_activity + timeout - time.monotonic()
            if remaining <= 0:
                self.stats.idle_closed += 1
                log.info("closing %s: idle for %.0fs", _peer(conn.client_writer), timeout)
                conn.abort()
                return
            await asyncio.sleep(remaining)


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


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer) if peer else "a unix peer"


async def run(config: ForwarderConfig, *, ready=None) -> ForwarderStats:
    """Run one forwarder until SIGTERM or SIGINT, then shut down gracefully. ``ready(forwarder)`` is
    called once it listens."""
    forwarder = Forwarder(config)
    await forwarder.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(forwarder.shutdown()))
    if ready is not None:
        ready(forwarder)
    await forwarder.serve_until_closed()
    return forwarder.stats
