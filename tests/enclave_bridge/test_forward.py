"""The forwarder over real TCP and unix sockets: exact bytes, half-close, limits, timeouts, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enclave_bridge.addresses import TcpAddress, UnixAddress, VsockAddress
from enclave_bridge.forward import Forwarder, ForwarderConfig, open_stream

REPO = Path(__file__).parents[2]
MiB = 1024 * 1024


class Peer:
    """A target server running ``handler(reader, writer)`` per connection, recording results."""

    def __init__(self, handler):
        self.handler = handler
        self.results: list = []
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            self.results.append(await self.handler(reader, writer))
        finally:
            writer.close()

    async def start_tcp(self) -> TcpAddress:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return TcpAddress("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def start_unix(self, path: Path) -> UnixAddress:
        self.server = await asyncio.start_unix_server(self._serve, str(path))
        return UnixAddress(str(path))

    async def stop(self):
        if self.server:
            self.server.close()


@contextlib.asynccontextmanager
async def running(*forwarders: Forwarder):
    for f in forwarders:
        await f.start()
    try:
        yield forwarders
    finally:
        for f in reversed(forwarders):
            await f.shutdown(grace=0)


async def until(condition, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def read_all(reader) -> bytes:
    chunks = []
    while chunk := await reader.read(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def write_all(writer, data: bytes, chunk: int = 1 << 16):
    for i in range(0, len(data), chunk):
        writer.write(data[i:i + chunk])
        await writer.drain()
    writer.write_eof()


def both_ways_handler(payload: bytes):
    async def handler(reader, writer):
        received, _ = await asyncio.gather(read_all(reader), write_all(writer, payload))
        return hashlib.sha256(received).hexdigest()
    return handler


async def transfer_both_ways(address, upstream: bytes):
    reader, writer = await open_stream(address)
    received, _ = await asyncio.gather(read_all(reader), write_all(writer, upstream))
    writer.close()
    return received


@pytest.mark.parametrize("chain", ["tcp->tcp", "unix->tcp", "tcp->unix->tcp"])
async def test_large_random_data_arrives_byte_exact_both_ways(tmp_path, chain):
    up, down = os.urandom(8 * MiB + 17), os.urandom(6 * MiB + 5)
    peer = Peer(both_ways_handler(down))
    target = await peer.start_tcp()
    if chain == "tcp->tcp":
        forwarders = [Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), target))]
    elif chain == "unix->tcp":
        forwarders = [Forwarder(ForwarderConfig(UnixAddress(str(tmp_path / "in.sock")), target))]
    else:  # Envoy -> parent forwarder -> (vsock stand-in: unix) -> enclave forwarder -> broker
        middle = UnixAddress(str(tmp_path / "vsock-stand-in.sock"))
        forwarders = [Forwarder(ForwarderConfig(middle, target)),
                      Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), middle))]
    async with running(*forwarders):
        received = await asyncio.wait_for(transfer_both_ways(forwarders[-1].bound_address, up), 60)
        await until(lambda: peer.results)
    await peer.stop()
    assert hashlib.sha256(received).digest() == hashlib.sha256(down).digest() and len(received) == len(down)
    assert peer.results == [hashlib.sha256(up).hexdigest()]
    assert forwarders[-1].stats.bytes_to_target == len(up) and forwarders[-1].stats.bytes_to_client == len(down)


@pytest.mark.parametrize("target_kind", ["tcp", "unix"])
async def test_client_eof_reaches_the_target_and_the_reply_still_flows(tmp_path, target_kind):
    async def handler(reader, writer):
        request = await read_all(reader)  # returns only once the client's EOF came through
        for part in (b"reply to ", request, b" after your EOF"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        return request

    peer = Peer(handler)
    target = await (peer.start_tcp() if target_kind == "tcp" else peer.start_unix(tmp_path / "t.sock"))
    async with running(Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), target))) as (fwd,):
        reader, writer = await open_stream(fwd.bound_address)
        writer.write(b"question")
        writer.write_eof()
        reply = await asyncio.wait_for(read_all(reader), 10)
        writer.close()
    await peer.stop()
    assert peer.results == [b"question"]
    assert reply == b"reply to question after your EOF"


@pytest.mark.parametrize("listen_kind", ["tcp", "unix"])
async def test_target_eof_reaches_the_client_and_the_client_can_still_send(tmp_path, listen_kind):
    async def handler(reader, writer):
        writer.write(b"banner")
        writer.write_eof()  # the target is done talking but keeps listening
        return await read_all(reader)

    peer = Peer(handler)
    target = await peer.start_tcp()
    listen = TcpAddress("127.0.0.1", 0) if listen_kind == "tcp" else UnixAddress(str(tmp_path / "in.sock"))
    async with running(Forwarder(ForwarderConfig(listen, target))) as (fwd,):
        reader, writer = await open_stream(fwd.bound_address)
        assert await asyncio.wait_for(read_all(reader), 10) == b"banner"  # EOF arrived
        for _ in range(3):
            writer.write(b"still sending;")
            await writer.drain()
        writer.write_eof()
        await until(lambda: peer.results)
        writer.close()
    await peer.stop()
    assert peer.results == [b"still sending;" * 3]


def echo_handler():
    async def handler(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        return "done"
    return handler


async def echo_once(reader, writer, message: bytes) -> bytes:
    writer.write(message)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(message)), 10)


async def is_refused(reader) -> bool:
    """A refused connection is closed at once: EOF or reset, without data."""
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


async def test_connections_beyond_the_limit_are_refused_and_slots_free_up():
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    config = ForwarderConfig(TcpAddress("127.0.0.1", 0), target, max_connections=2)
    async with running(Forwarder(config)) as (fwd,):
        first = await open_stream(fwd.bound_address)
        second = await open_stream(fwd.bound_address)
        assert await echo_once(*first, b"one") == b"one"
        assert await echo_once(*second, b"two") == b"two"

        third_reader, third_writer = await open_stream(fwd.bound_address)
        assert await is_refused(third_reader)
        assert fwd.stats.refused == 1 and peer.connections == 2
        assert await echo_once(*first, b"one again") == b"one again"  # the others are unaffected

        first[1].close()
        for _ in range(100):
            if fwd.stats.active < 2:
                break
            await asyncio.sleep(0.05)
        fourth = await open_stream(fwd.bound_address)
        assert await echo_once(*fourth, b"four") == b"four"
        for _, w in (second, fourth):
            w.close()
        third_writer.close()
    await peer.stop()


async def test_extra_connections_can_queue_for_a_slot():
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    config = ForwarderConfig(TcpAddress("127.0.0.1", 0), target, max_connections=1, queue_timeout=10)
    async with running(Forwarder(config)) as (fwd,):
        first = await open_stream(fwd.bound_address)
        assert await echo_once(*first, b"first") == b"first"
        second_reader, second_writer = await open_stream(fwd.bound_address)
        second_writer.write(b"queued")
        await asyncio.sleep(0.3)
        assert peer.connections == 1  # still waiting for the slot
        first[1].close()
        assert await asyncio.wait_for(second_reader.readexactly(6), 10) == b"queued"
        second_writer.close()
    await peer.stop()
    assert fwd.stats.refused == 0


async def test_queued_connections_give_up_after_the_queue_timeout():
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    config = ForwarderConfig(TcpAddress("127.0.0.1", 0), target, max_connections=1, queue_timeout=0.3)
    async with running(Forwarder(config)) as (fwd,):
        first = await open_stream(fwd.bound_address)
        assert await echo_once(*first, b"x") == b"x"
        reader, writer = await open_stream(fwd.bound_address)
        assert await is_refused(reader)
        assert fwd.stats.refused == 1
        first[1].close()
        writer.close()
    await peer.stop()


async def test_idle_connections_are_closed_and_busy_ones_are_not():
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    config = ForwarderConfig(TcpAddress("127.0.0.1", 0), target, idle_timeout=1.0)
    async with running(Forwarder(config)) as (fwd,):
        idle_reader, idle_writer = await open_stream(fwd.bound_address)
        busy = await open_stream(fwd.bound_address)
        for i in range(25):  # ~2.5 s of traffic, each gap well under the idle timeout
            assert await echo_once(*busy, b"%d" % i) == b"%d" % i
            await asyncio.sleep(0.1)
        assert await is_refused(idle_reader)
        assert fwd.stats.idle_closed == 1
        busy[1].close()
        idle_writer.close()
    await peer.stop()


async def test_unreachable_target_closes_the_client_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = TcpAddress("127.0.0.1", s.getsockname()[1])  # bound, not listening: refused
    async with running(Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), dead))) as (fwd,):
        reader, writer = await open_stream(fwd.bound_address)
        assert await is_refused(reader)
        writer.close()
    assert fwd.stats.connect_failures == 1 and fwd.stats.bytes_to_target == 0


async def test_vsock_target_that_cannot_connect_fails_closed_within_the_connect_timeout():
    """vsock does not connect on this machine: the real AF_VSOCK connect path must still fail closed."""
    config = ForwarderConfig(TcpAddress("127.0.0.1", 0), VsockAddress(3, 5005), connect_timeout=1)
    async with running(Forwarder(config)) as (fwd,):
        reader, writer = await open_stream(fwd.bound_address)
        assert await is_refused(reader)
        writer.close()
    assert fwd.stats.connect_failures == 1


async def test_shutdown_stops_accepting_and_lets_in_flight_connections_finish():
    async def slow_handler(reader, writer):
        request = await read_all(reader)
        await asyncio.sleep(0.5)
        writer.write(b"late answer to " + request)
        await writer.drain()
        return request

    peer = Peer(slow_handler)
    target = await peer.start_tcp()
    fwd = Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), target, shutdown_grace=10))
    await fwd.start()
    address = fwd.bound_address
    reader, writer = await open_stream(address)
    writer.write(b"q")
    writer.write_eof()
    await asyncio.sleep(0.1)
    shutdown = asyncio.create_task(fwd.shutdown())
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        await open_stream(address)  # no longer accepting
    assert await asyncio.wait_for(read_all(reader), 10) == b"late answer to q"
    await asyncio.wait_for(shutdown, 10)
    writer.close()
    await peer.stop()


async def test_shutdown_cuts_connections_that_outlive_the_grace():
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    fwd = Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), target, idle_timeout=None))
    await fwd.start()
    reader, writer = await open_stream(fwd.bound_address)
    assert await echo_once(reader, writer, b"hi") == b"hi"
    await asyncio.wait_for(fwd.shutdown(grace=0.3), 10)
    assert await is_refused(reader)
    writer.close()
    await peer.stop()


async def test_a_slow_target_pushes_back_instead_of_buffering_everything(tmp_path):
    release = asyncio.Event()

    async def slow_reader(reader, writer):
        await release.wait()
        return hashlib.sha256(await read_all(reader)).hexdigest()

    peer = Peer(slow_reader)
    target = await peer.start_unix(tmp_path / "slow.sock")
    data = os.urandom(64 * MiB)
    async with running(Forwarder(ForwarderConfig(TcpAddress("127.0.0.1", 0), target))) as (fwd,):
        reader, writer = await open_stream(fwd.bound_address)
        sending = asyncio.create_task(write_all(writer, data, chunk=1 * MiB))
        await asyncio.sleep(1.0)
        assert not sending.done()  # the client is held back ...
        assert fwd.stats.bytes_to_target < 16 * MiB  # ... and the forwarder did not swallow it all
        release.set()
        await asyncio.wait_for(sending, 60)
        await asyncio.wait_for(read_all(reader), 60)
        writer.close()
    await peer.stop()
    assert peer.results == [hashlib.sha256(data).hexdigest()]


async def test_unix_listener_replaces_a_stale_socket_but_not_a_regular_file(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # leaves the socket file behind, nobody listening
    peer = Peer(echo_handler())
    target = await peer.start_tcp()
    async with running(Forwarder(ForwarderConfig(UnixAddress(str(stale)), target))) as (fwd,):
        assert await echo_once(*(await open_stream(fwd.bound_address)), b"ok") == b"ok"
    assert not stale.exists()  # removed on shutdown
    regular = tmp_path / "important.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        await Forwarder(ForwarderConfig(UnixAddress(str(regular)), target)).start()
    assert regular.read_text() == "keep me"
    await peer.stop()


def test_config_refuses_nonsense_limits():
    a = TcpAddress("127.0.0.1", 0)
    with pytest.raises(ValueError, match="max_connections"):
        ForwarderConfig(a, a, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        ForwarderConfig(a, a, idle_timeout=-1)
    with pytest.raises(ValueError, match="buffer_size"):
        ForwarderConfig(a, a, buffer_size=10)


# -- the command line ---------------------------------------------------------------------------

def forward_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpactl.app", "forward", *args]


def test_mpactl_registers_the_forward_command():
    from mpactl.app import app
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "forward" in names


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp://127.0.0.1", "--to", "tcp://127.0.0.1:1"], "missing port"),
    (["--listen", "tcp://127.0.0.1:0", "--to", "vsock://any:80"], "cannot connect to CID 'any'"),
    (["--listen", "ftp://x:1", "--to", "tcp://127.0.0.1:1"], "unknown scheme"),
    (["--listen", "vsock://any:80", "--to", "unix://relative"], "must be absolute"),
])
def test_cli_refuses_bad_urls_with_a_clear_error(args, message):
    done = subprocess.run(forward_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"})
    assert done.returncode == 2
    assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())


def test_cli_forwards_and_drains_in_flight_connections_on_sigterm():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        target_port = server.getsockname()[1]
        proc = subprocess.Popen(
            forward_cmd("--listen", "tcp://127.0.0.1:0", "--to", f"tcp://127.0.0.1:{target_port}",
                        "--shutdown-grace", "20"),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            banner = proc.stdout.readline()
            assert banner.startswith("forwarding tcp://127.0.0.1:"), banner + proc.stderr.read()
            port = int(banner.split()[1].rsplit(":", 1)[1])
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            upstream, _ = server.accept()
            upstream.settimeout(10)
            client.sendall(b"before SIGTERM")
            assert upstream.recv(100) == b"before SIGTERM"

            proc.send_signal(signal.SIGTERM)
            stopped_accepting = False
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    stopped_accepting = True
                    break
                time.sleep(0.05)
            assert stopped_accepting
            # A probe that raced the SIGTERM may have been accepted and forwarded: it is in flight
            # too, so end it from the target side or the forwarder rightly waits out the grace.
            server.settimeout(0.5)
            with contextlib.suppress(OSError):
                while True:
                    server.accept()[0].close()
            client.sendall(b" and after")  # the in-flight connection still works during the grace
            assert upstream.recv(100) == b" and after"
            upstream.sendall(b"bye")
            assert client.recv(100) == b"bye"
            client.close()
            upstream.close()
            assert proc.wait(timeout=20) == 0
            assert "stopped:" in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_listens_on_a_real_vsock_socket():
    """Listening (bind + accept loop) on AF_VSOCK works here even though connecting does not."""
    import errno
    for attempt in range(20):
        config = ForwarderConfig(VsockAddress(0xFFFFFFFF, 48000 + (os.getpid() + attempt * 37) % 10000),
                                 TcpAddress("127.0.0.1", 1))
        fwd = Forwarder(config)
        try:
            await fwd.start()
            break
        except OSError as e:
            if e.errno in (errno.EAFNOSUPPORT, errno.ENODEV):
                pytest.skip(f"this kernel has no vsock transport: {e}")
            if e.errno != errno.EADDRINUSE:
                raise
    else:
        pytest.fail("no free vsock port found")
    assert fwd._server is not None and fwd._server.sockets[0].family == socket.AF_VSOCK
    assert str(fwd.bound_address) == f"vsock://any:{config.listen.port}"
    await fwd.shutdown(grace=0)


def test_cli_second_sigterm_cuts_in_flight_connections_at_once():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        proc = subprocess.Popen(
            forward_cmd("--listen", "tcp://127.0.0.1:0", "--to", f"tcp://127.0.0.1:{server.getsockname()[1]}",
                        "--shutdown-grace", "600"),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline().split()[1].rsplit(":", 1)[1])
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            upstream, _ = server.accept()
            client.sendall(b"x")
            assert upstream.recv(1) == b"x"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert proc.poll() is None  # waiting for the in-flight connection
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            client.settimeout(10)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
            client.close()
            upstream.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
