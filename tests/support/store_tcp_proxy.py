"""A TCP relay on 127.0.0.1 that a test can cut, hang, point elsewhere and restore, to make a
server "go away" (PostgreSQL, a reflection endpoint) without touching the server itself.

``stop()`` closes the listening socket and every relayed connection (clients see the
server vanish); ``start()`` listens again on the same port. ``hang()`` keeps accepting and
keeps every connection open but forwards nothing in either direction (a server that stopped
answering; bytes received meanwhile are held); ``resume()`` delivers them and forwards again.
``retarget(host, port)`` sends new connections elsewhere and closes the relayed ones.
"""
from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()

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
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
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
