"""Shared pieces for the approvals tests: a dev issuer with JWKS, a store, a running server."""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx

import policy
from devstack.devissuer import DevIssuer
from mpa.config import ApprovalsConfig, RequestPolicy
from mpa.server import ApprovalsServer, start_approvals_server
from mpa.service import static_modes
from policy import Grant, Mode, Role, Target

LEDGER = "demo.v1.Ledger"
MODES = {
    f"/{LEDGER}/Adjust": Mode.ENGINEERS_WITH_APPROVAL,
    f"/{LEDGER}/Close": Mode.CONTRIBUTORS_WITH_APPROVAL,
    f"/{LEDGER}/Wipe": Mode.BREAK_GLASS_ONLY,
}
ENGINEERS = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com")
CONTRIBUTORS = ("alice@example.com", "carol@example.com")
ONCALL = ("dave@example.com", "erin@example.com")


def open_test_store(tmp_path: pathlib.Path, url: str | None = None):
    """A real store: ``url`` (e.g. a PostgreSQL DSN), or a SQLite file in ``tmp_path``."""
    from policy.stores import open_store
    return open_store(url or f"sqlite:///{tmp_path / 'rpcauthz.db'}")


def seed_grants(store) -> None:
    for p in ENGINEERS + ONCALL:
        store.put_grant(Grant(p, Role.ENGINEER))
    for p in CONTRIBUTORS:
        store.put_grant(Grant(p, Role.CONTRIBUTOR, service=LEDGER))
    for p in ONCALL:
        store.put_grant(Grant(p, Role.SECURITY_ONCALL))


@dataclasses.dataclass
class Env:
    issuer: DevIssuer
    server: ApprovalsServer
    store: object
    tmp: pathlib.Path

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.mint(who)}"}

    def call(self, method: str, path: str, who: str | None = None, **kw) -> httpx.Response:
        headers = {**(self.headers(who) if who else {}), **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=20, **kw)

    def gateway_request(self, requester: str, method: str = "Adjust") -> policy.ApprovalRequest:
        """Open a request the way the gateway does (no reason yet)."""
        now = datetime.now(UTC)
        grants = policy.GrantSet(self.store.list_grants())
        r = policy.open_request(request_id=f"gw{now.timestamp():.0f}{method}", requester=requester,
                                target=Target(LEDGER, method), mode=MODES[f"/{LEDGER}/{method}"],
                                grants=grants, now=now, origin="gateway")
        return self.store.get_or_create_pending(r, actor=requester)[0]


@contextlib.contextmanager
def approvals_env(tmp_path: pathlib.Path, *, rules: RequestPolicy | None = None,
                  store_url: str | None = None, **server_kw) -> Iterator[Env]:
    issuer = DevIssuer(tmp_path / "dev-issuer.pem")
    jwks = issuer.serve()
    store = open_test_store(tmp_path, store_url)
    seed_grants(store)
    settings = dict(store_url="(given)", issuer=issuer.issuer, jwks_url=jwks.url,
                    audiences=(issuer.audience,), public_url="auto",
                    policy=rules or RequestPolicy(), dev_login=True)
    settings.update(server_kw.pop("config", {}))
    config = ApprovalsConfig(**settings)
    server_kw.setdefault("mode_lookup", static_modes(MODES))
    server = start_approvals_server(config, store=store, dev_issuer=issuer, **server_kw)
    try:
        yield Env(issuer, server, store, tmp_path)
    finally:
        server.close()
        jwks.close()
        store.close()
