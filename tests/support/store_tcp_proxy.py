"""A TCP relay on 127.0.0.1 that a test can cut, hang, point elsewhere and restore, to make a
server "go away" (PostgreSQL, a reflection endpoint) without touching the server itself.

``stop()`` closes the listening socket and every relayed connection (clients see the
server vanish); ``start()`` listens again on the same port. ``hang()`` keeps accepting and
keeps every connection open but forwards nothing in either direction (a server that stopped
answering; bytes received meanwhile are held); ``resume()`` delivers them and forwards again.
``retarget(host, port)`` sends new connections elsewhere and closes the relayed ones.

``trap(after, hold)`` hangs one connection at an exact moment: the first client-to-server
chunk containing ``hold`` on a connection that has already sent ``after`` is held (not
forwarded) until ``Trap.release()`` forwards it or ``Trap.cut()`` closes that connection.
E.g. ``trap(b"INSERT INTO spends", b"COMMIT")`` holds the COMMIT of a spend in flight.
"""
from __future__ import annotations

import contextlib
import socket
import threading


class Trap:
    """One armed hold (see the module docstring); ``sprung`` is set once a chunk is held."""

    def __init__(self, after: bytes, hold: bytes) -> None:
        self.after, self.hold = after, hold
        self.sprung = threading.Event()
        self._go = threading.Event()
        self._cut = False

    def release(self) -> None:
        """Forward the held chunk (the server gets it late)."""
        self._go.set()

    def cut(self) -> None:
        """Close the held connection instead (the server never gets the chunk)."""
        self._cut = True
        self._go.set()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._trap: Trap | None = None

    def trap(self, after: bytes, hold: bytes) -> Trap:
        """Arm a hold for the next matching connection (see the module docstring)."""
        self._trap = Trap(after, hold)
        return self._trap

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool = False) -> None:
        seen_after = False
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                trap = self._trap if upstream else None
                if trap is not None and not trap.sprung.is_set():
                    seen_after = seen_after or trap.after in data
                    if seen_after and trap.hold in data:
                        trap.sprung.set()
                        trap._go.wait()
                        if trap._cut:
                            return  # the finally below closes both directions
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def hang(self) -> None:
        """Accept and hold connections, forward nothing (until ``resume()``)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def retarget(self, host: str, port: int) -> None:
        """New connections go to ``host:port``; the relayed ones are closed."""
        self.target = (host, port)
        self._close_relayed()

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self._close_relayed()

    def _close_relayed(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
