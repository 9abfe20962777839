"""Run the approvals server: the API and page, the expiry sweeper, audit shipping, Slack.

``start_approvals_server(...)`` starts everything in background threads of this process and
returns a handle to stop it (for ``mpactl demo``, tests and ``mpactl approvals serve``, which
runs it in the foreground from a YAML file: mpa/serve_cli.py, docs/approvals.md).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn

from policy.store import Store
from rpcauthz.slack_outbox import SlackDelivery, SlackSpool

from .api import create_app
from .audit import AuditExporter, AuditShipper, JsonLinesExporter
from .auth import TokenVerifier
from .body_types import BodyEncoder
from .broker_link import BrokerLink
from .config import ApprovalsConfig
from .dev_tokens import JWKS_PATH, DevTokens
from .escalation import OnCallEscalation, with_routing_key
from .service import ModeLookup
from .slack import SlackNotifier

log = logging.getLogger("mpa.server")


def open_store(url: str, statement_timeout: float | None = None) -> Store:
    """The store for ``url`` (sqlite:///path or postgresql://...); ``statement_timeout``:
    PostgreSQL's bound on each statement (``policy.stores.postgres.PostgresStore``)."""
    from policy.stores import open_store as _open
    return _open(url, statement_timeout=statement_timeout)


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
    #: Where the server's own dev tokens' key set is served (``dev_login.issuer_key``), else None.
    dev_jwks_url: str | None = None
    #: Further things to close last (the on-call escalation outbox).
    closers: list[Any] = dataclasses.field(default_factory=list)

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
        for thing in self.closers:
            thing.close()
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
                           broker: BrokerLink | None = None,
                           body_encoder: BodyEncoder | None = None) -> ApprovalsServer:
    """Start the approvals server in this process and return once it accepts connections.

    ``store`` defaults to ``open_store(config.store_url)``. ``mode_lookup`` tells the mode of
    a method for user-made requests (e.g. ``mpa.service.modes_from_source(reflection_cache)``);
    without it only gateway-opened requests can be completed. ``dev_issuer`` (anything with
    ``mint``, e.g. ``devstack.devissuer.DevIssuer``) enables the dev-only sign-in when
    ``config.dev_login`` is set; with ``config.dev_login.issuer_key`` the server mints dev
    tokens itself and serves their JWKS at ``dev_jwks_url``. Dev login on without either is an
    error, never a silently missing sign-in. ``broker`` (a ``mpa.broker_link.BrokerLink``)
    puts credential requests in the web inbox.
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
        store = store or open_store(config.store_url, config.store_statement_timeout_s or None)
    except BaseException:
        sock.close()
        raise
    if config.public_url in ("", "auto"):
        config = config.model_copy(update={"public_url": f"http://{host}:{port}"})
    verifier = dev_jwks_url = None
    if config.dev_login is not None and dev_issuer is None:
        if config.dev_login.issuer_key is None:
            sock.close()
            if owns:
                store.close()
            raise ValueError("dev_login is on but no dev issuer was given: set dev_login.issuer_key")
        dev_issuer = DevTokens(pathlib.Path(config.dev_login.issuer_key))
        dev_jwks_url = config.public_url.rstrip("/") + JWKS_PATH
        config = config.model_copy(update={"issuer": dev_issuer.issuer, "jwks_url": dev_jwks_url,
                                           "audiences": (dev_issuer.audience,)})
        verifier = TokenVerifier(config.issuer, config.jwks_url, config.audiences,
                                 jwks=dev_issuer.jwks())
    if broker is None and config.broker is not None:
        try:
            broker = BrokerLink.from_files(config.broker.address, config.broker.certificate,
                                           config.broker.server_name)
        except ValueError as e:
            sock.close()
            if owns:
                store.close()
            raise ValueError(f"broker.certificate: {e}") from None
    app = create_app(config, store, mode_lookup=mode_lookup, dev_issuer=dev_issuer,
                     verifier=verifier, broker=broker, body_encoder=body_encoder)

    all_exporters: list[AuditExporter] = [*exporters, app.state.metrics]
    if config.audit_jsonl_path:
        all_exporters.append(JsonLinesExporter(config.audit_jsonl_path))
    spool = delivery = None
    if config.slack_webhook_url:
        spool = SlackSpool(config.slack_spool_path or "mpa-slack-spool.db")
        all_exporters.append(SlackNotifier(store, spool, app.state.link, config.slack_user_ids))
        delivery = SlackDelivery(spool, config.slack_webhook_url, timeout=slack_timeout,
                                 base_backoff=slack_backoff[0], max_backoff=slack_backoff[1]).start()
    closers: list[Any] = []
    if config.otel is not None:
        from .otel_export import start_otlp_audit_export
        otlp = start_otlp_audit_export(config.otel)
        all_exporters.append(otlp)
        closers.append(otlp)
    if config.oncall_escalation is not None:
        esc = config.oncall_escalation
        esc_spool = SlackSpool(esc.spool_path or "mpa-oncall-spool.db")
        all_exporters.append(OnCallEscalation(store, esc_spool, app.state.link))
        paging = SlackDelivery(esc_spool, esc.url, timeout=slack_timeout,
                               base_backoff=slack_backoff[0], max_backoff=slack_backoff[1])
        paging.prepare = with_routing_key(esc.routing_key)  # never spooled
        closers += [paging.start(), esc_spool]
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
            for thing in closers:
                thing.close()
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
                           spool, server, thread, stop, sweeper, owns, dev_jwks_url, closers)
