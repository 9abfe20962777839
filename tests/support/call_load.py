"""A bounded call load through the gateway, recording every answer with its time.

``CallLoad(gateway, path, token, threads=4).start()`` keeps ``threads`` callers busy (one
persistent HTTP/2 channel each, as real clients have) until ``stop()``; ``results`` holds
``(monotonic time, grpc.StatusCode)`` per call. Used by the failover and fault tests.
"""
from __future__ import annotations

import threading
import time

import grpc


class CallLoad:
    def __init__(self, gateway: str, path: str, token: str, *, threads: int = 4,
                 timeout: float = 5.0, pause: float = 0.0) -> None:
        self.gateway, self.path, self.token = gateway, path, token
        self.threads, self.timeout, self.pause = threads, timeout, pause
        self.results: list[tuple[float, grpc.StatusCode]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> CallLoad:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"call-load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout + 5)

    def _run(self) -> None:
        with grpc.insecure_channel(self.gateway) as ch:
            call = ch.unary_unary(self.path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            md = [("authorization", f"Bearer {self.token}")]
            while not self._stop.is_set():
                try:
                    call(b"", timeout=self.timeout, metadata=md)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with self._lock:
                    self.results.append((time.monotonic(), code))
                if self.pause:
                    time.sleep(self.pause)

    def between(self, start: float, end: float = float("inf")) -> list[tuple[float, grpc.StatusCode]]:
        with self._lock:
            return [r for r in self.results if start <= r[0] < end]

    @staticmethod
    def summary(results: list[tuple[float, grpc.StatusCode]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, code in results:
            out[code.name] = out.get(code.name, 0) + 1
        return out
