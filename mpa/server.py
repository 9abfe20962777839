"""Run the approvals server: the API and page, the expiry sweeper, audit shipping, Slack.

``start_approvals_server(...)`` starts everything in background threads of this process and
returns a handle to stop it (for ``mpactl demo`` and tests). ``python -m mpa.server`` runs it
in the foreground from ``MPA_*`` environment variables (docs/approvals.md).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn

from policy.store import Store
from rpcauthz.slack_outbox import SlackDelivery, SlackSpool

from .api import create_app
from .audit import AuditExporter, AuditShipper, JsonLinesExporter
from .broker_link import BrokerLink
from .config import ApprovalsConfig
from .service import ModeLookup
from .slack import SlackNotifier

log = logging.getLogger("mpa.server")


def open_store(url: str) -> Store:
    """The store for ``url`` (sqlite:///path or postgresql://...)."""
    from policy.stores import open_store as _open
    return _open(url)


@dataclasses.dataclass
class ApprovalsServer:
    """A running approvals server. ``url`` is where it listens; ``close()`` stops it all."""

    url: str
    port: int
    config: ApprovalsConfig
    store: Store
    app: Any
    shipper: AuditShipper
    slack: SlackDelivery | None
    spool: SlackSpool | None
    _uvicorn: uvicorn.Server
    _thread: threading.Thread
    _sweeper_stop: threading.Event
    _sweeper: threading.Thread
    _owns_store: bool

    def link(self, request_id: str) -> str:
        return self.app.state.link(request_id)

    def sweep_now(self) -> int:
        """Expire what is due now (the sweeper also does this every few seconds)."""
        return len(self.app.state.service.sweep_expired())

    def close(self) -> None:
        self._sweeper_stop.set()
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self._sweeper.join(timeout=10)
        self.shipper.close()
        if self.slack:
            self.slack.close()
        if self.spool:
            self.spool.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> ApprovalsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_approvals_server(config: ApprovalsConfig, *, host: str = "127.0.0.1", port: int = 0,
                           store: Store | None = None, mode_lookup: ModeLookup | None = None,
                           dev_issuer: Any = None, exporters: Sequence[AuditExporter] = (),
                           slack_backoff: tuple[float, float] = (1.0, 300.0),
                           slack_timeout: float = 5.0, audit_interval: float = 1.0,
                           audit_cursor_path: str | None = None,
                           broker: BrokerLink | None = None) -> ApprovalsServer:
    """Start the approvals server in this process and return once it accepts connections.

    ``store`` defaults to ``open_store(config.store_url)``. ``mode_lookup`` tells the mode of
    a method for user-made requests (e.g. ``mpa.service.modes_from_source(reflection_cache)``);
    without it only gateway-opened requests can be completed. ``dev_issuer`` (a
    ``devstack.devissuer.DevIssuer``) enables the dev-only sign-in when ``config.dev_login``.
    ``broker`` (a ``mpa.broker_link.BrokerLink``) puts credential requests in the web inbox.
    """
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"the approvals server did not start on {host}:{port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    owns = store is None
    try:
        store = store or open_store(config.store_url)
    except BaseException:
        sock.close()
        raise
    if config.public_url in ("", "auto"):
        config = dataclasses.replace(config, public_url=f"http://{host}:{port}")
    app = create_app(config, store, mode_lookup=mode_lookup, dev_issuer=dev_issuer, broker=broker)

    all_exporters: list[AuditExporter] = list(exporters)
    if config.audit_jsonl_path:
        all_exporters.append(JsonLinesExporter(config.audit_jsonl_path))
    spool = delivery = None
    if config.slack_webhook_url:
        spool = SlackSpool(config.slack_spool_path or "mpa-slack-spool.db")
        all_exporters.append(SlackNotifier(store, spool, app.state.link, config.slack_user_ids))
        delivery = SlackDelivery(spool, config.slack_webhook_url, timeout=slack_timeout,
                                 base_backoff=slack_backoff[0], max_backoff=slack_backoff[1]).start()
    cursor = audit_cursor_path or (config.audit_jsonl_path + ".cursor" if config.audit_jsonl_path else None)
    shipper = AuditShipper(store, all_exporters, cursor_path=cursor).start(audit_interval)

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="approvals-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            shipper.close()
            if delivery:
                delivery.close()
            if spool:
                spool.close()
            if owns:
                store.close()
            raise RuntimeError(f"the approvals server did not start on {host}:{port}")
        time.sleep(0.02)

    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(config.expiry_sweep_seconds):
            try:
                app.state.service.sweep_expired()
            except Exception as e:  # store down: try again next round
                log.warning("expiry sweep failed: %s", e)
    sweeper = threading.Thread(target=sweep, name="expiry-sweeper", daemon=True)
    sweeper.start()
    log.info("approvals server on http://%s:%d", host, port)
    return ApprovalsServer(f"http://{host}:{port}", port, config, store, app, shipper, delivery,
                           spool, server, thread, stop, sweeper, owns)


def main() -> None:
    """``python -m mpa.server``: serve from MPA_* environment variables until interrupted.

    With ``MPA_DEV_ISSUER_KEY=/path/key.pem`` (and no ``MPA_ISSUER``) it runs the dev issuer
    itself (JWKS on a local port, dev sign-in on): for demos only.
    """
    import os
    import pathlib
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host = os.environ.get("MPA_LISTEN_HOST", "127.0.0.1")
    port = int(os.environ.get("MPA_LISTEN_PORT", "8081"))
    dev_issuer = jwks = None
    if os.environ.get("MPA_DEV_ISSUER_KEY") and not os.environ.get("MPA_ISSUER"):
        from devstack.devissuer import DevIssuer  # TODO(layout): dev sign-in without devstack
        dev_issuer = DevIssuer(pathlib.Path(os.environ["MPA_DEV_ISSUER_KEY"]))
        jwks = dev_issuer.serve(host)
        config = ApprovalsConfig.from_env(issuer=dev_issuer.issuer, jwks_url=jwks.url,
                                          audiences=(dev_issuer.audience,), dev_login=True)
    else:
        try:
            config = ApprovalsConfig.from_env()
        except ValueError as e:
            raise SystemExit(f"mpa.server: {e} (see docs/approvals.md)") from None
    broker = None
    if os.environ.get("MPA_BROKER"):
        if not os.environ.get("MPA_BROKER_CERT"):
            raise SystemExit("mpa.server: MPA_BROKER is set but MPA_BROKER_CERT (the broker's "
                             "certificate, pinned) is not")
        try:
            broker = BrokerLink.from_files(os.environ["MPA_BROKER"], os.environ["MPA_BROKER_CERT"],
                                           os.environ.get("MPA_BROKER_NAME") or "broker.mpa.internal")
        except ValueError as e:
            raise SystemExit(f"mpa.server: {e}") from None
    handle = start_approvals_server(config, host=host, port=port, dev_issuer=dev_issuer,
                                    broker=broker)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"approvals server listening on {handle.url}", flush=True)
    done.wait()
    handle.close()
    if jwks is not None:
        jwks.close()


if __name__ == "__main__":
    main()
