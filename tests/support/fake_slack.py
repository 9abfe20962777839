"""A real local HTTP server standing in for hooks.slack.com (Slack's incoming webhook).

``FakeSlack(port)`` listens on ``port`` (reserve it first and leave it closed to play "Slack is
down"); ``mode`` is ``"ok"`` or ``"slow"`` (reads the whole message, answers after
``slow_s`` seconds); ``received`` holds ``(path, payload)`` of every message it took.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeSlack:
    def __init__(self, port: int, *, mode: str = "ok", slow_s: float = 2.0) -> None:
        self.port, self.mode, self.slow_s = port, mode, slow_s
        self.received: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.mode == "slow":
                    time.sleep(outer.slow_s)
                outer.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
